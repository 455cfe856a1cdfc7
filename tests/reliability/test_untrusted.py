"""Untrusted text never runs code, and model repositories' code is not trusted unless params say so.

* Answers crafted to execute code through the parser stack (``__import__``, ``eval(``, ``exec``,
  ``lambda``, dunder attributes) -- as responses and as reference answers, in-process, in worker
  processes and through the verify stage: a sentinel file that each payload would create must not
  exist afterwards, and every string sympy parses as Python is a plain numeral.
* ``trust_remote_code``: ``model.trust_remote_code`` is false in params.yaml; every place that loads
  a model or tokenizer passes it explicitly, from params; a model folder whose config points at
  custom code does not run that code unless ``trust_remote_code=True`` (sentinel again; the
  positive control proves the sentinel would appear).
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from drsft import verify as V
from drsft.verify import verify_answer, verify_batch

ROOT = Path(__file__).resolve().parents[2]
T = 1.0

MALICIOUS = [
    "__import__('os').system('touch {s}')",
    "eval(\"__import__('os').system('touch {s}')\")",
    "exec(\"import os; os.system('touch {s}')\")",
    "(lambda: __import__('os').system('touch {s}'))()",
    "().__class__.__bases__[0].__subclasses__()",
    "open('{s}', 'w').write('x')",
    "__builtins__.__dict__['__import__']('os').system('touch {s}')",
    "getattr(__import__('os'), 'system')('touch {s}')",
    "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0](['touch', '{s}'])",
]


def _payload_pairs(sentinel: Path) -> list[tuple[str, str]]:
    pairs = []
    for m in MALICIOUS:
        text = m.format(s=sentinel)
        for resp in (rf"\boxed{{{text}}}", f"$\\boxed{{{text}}}$", f"The answer: {text}", rf"\boxed{{x = {text}}}",
                     f"The answer is {text}", f"so the final answer is: {text}."):  # paper mode's phrases
            pairs.append((resp, "5"))
            pairs.append((r"\boxed{5}", text))  # as the reference, too
    return pairs


def test_sentinel_would_be_created_by_the_payloads(tmp_path):
    """Positive control: evaluated as Python, the payloads do create the sentinel."""
    sentinel = tmp_path / "SENTINEL"
    code = MALICIOUS[0].format(s=sentinel)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert sentinel.exists()


def test_untrusted_text_is_never_executed(tmp_path, monkeypatch):
    sentinel = tmp_path / "SENTINEL"
    monkeypatch.chdir(tmp_path)
    # every string sympy is asked to parse as Python must be a plain numeral (sympy.Number(token))
    import sympy.parsing.sympy_parser as sp

    seen = []
    real = sp.parse_expr

    def spy(s, *a, **k):
        seen.append(s)
        return real(s, *a, **k)

    monkeypatch.setattr(sp, "parse_expr", spy)
    import math_verify.parser as mvp
    monkeypatch.setattr(mvp, "parse_expr", spy)
    monkeypatch.setattr(V, "_parse_cache", V._LRU(100))  # parse afresh, so the spy sees every call
    monkeypatch.setattr(V, "_reason_cache", V._LRU(100))
    for cached in ("parse_latex_cached", "parse_expr_cached"):  # math-verify's own small LRU caches
        if hasattr(getattr(mvp, cached, None), "cache_clear"):
            getattr(mvp, cached).cache_clear()

    pairs = _payload_pairs(sentinel)
    for mode in ("boxed", "paper"):
        for resp, ref in pairs:
            v = verify_answer(resp, ref, timeout_s=T, mode=mode)
            # (paper mode's last-number fallback may find a digit in the sentinel's path)
            assert not v.correct or resp == ref or mode == "paper"
        verify_batch(pairs, workers=2, timeout_s=T, mode=mode)
    assert not sentinel.exists()
    assert seen, "the spy is not hooked (sympy.Number('5') goes through parse_expr)"
    numeral = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
    assert all(isinstance(s, str) and numeral.fullmatch(s) for s in seen), [s for s in seen if not numeral.fullmatch(s)]


def test_verify_stage_runs_no_payload(tmp_path, monkeypatch, run_verify_stage):
    """Payloads as sample responses and as the problems' reference answers, through the verify stage."""
    sentinel = tmp_path / "SENTINEL"
    monkeypatch.chdir(tmp_path)
    problems, samples = [], []
    for k, m in enumerate(MALICIOUS):
        text = m.format(s=sentinel)
        problems.append({"id": f"p{k}", "problem": "?", "solution": "", "answer": text, "source": "t"})
        for i, resp in enumerate((rf"\boxed{{{text}}}", r"\boxed{5}", f"The answer: {text}")):
            samples.append({"problem_id": f"p{k}", "sample_index": i, "prompt": "P", "response": resp,
                            "response_ids": [1], "logprobs": [-1.0], "finish_reason": "stop"})
    result = run_verify_stage(tmp_path, problems, samples)
    assert result.exit_code == 0, (result.output, result.exception)
    assert len((tmp_path / "verdicts.jsonl").read_text(encoding="utf-8").splitlines()) == len(samples)
    assert not sentinel.exists()


# ------------------------------------------------------------------------------- trust_remote_code
LOADERS = {"from_pretrained", "load_model", "load_tokenizer", "make_backend", "LLM", "probe_world", "train"}


def _calls_with_trust(path: Path):
    """(call name, trust_remote_code keyword node or None, line) for each loader call in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in LOADERS:
                kw = next((k for k in node.keywords if k.arg == "trust_remote_code"), None)
                splat = any(k.arg is None for k in node.keywords)
                yield name, kw, splat, node.lineno, tree


def test_trust_remote_code_is_off_in_params():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert params["model"]["trust_remote_code"] is False
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
        assert (data.get("model") or {}).get("trust_remote_code", False) is False, cfg


def test_every_loader_gets_trust_remote_code_from_params():
    """Every model/tokenizer load in src/ and stages/ passes trust_remote_code explicitly (never a literal
    True); in stages/ the value comes from params (model.trust_remote_code); defaults are False."""
    problems = []
    files = sorted((ROOT / "src" / "drsft").glob("*.py")) + sorted((ROOT / "stages").glob("*.py"))
    for path in files:
        rel = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8")
        for name, kw, splat, line, tree in _calls_with_trust(path):
            if name == "train" and "stages" not in rel.parts:
                continue  # drsft.train.train is the loader; other modules' train(...) are not model loads
            if kw is None:
                if not splat:
                    problems.append(f"{rel}:{line}: {name}(...) without trust_remote_code=")
                continue
            if isinstance(kw.value, ast.Constant) and kw.value.value is True:
                problems.append(f"{rel}:{line}: {name}(trust_remote_code=True)")
            if "stages" in rel.parts:
                src = ast.get_source_segment(text, kw.value)
                if "trust_remote_code" not in src:  # a name: it must be assigned from params' model section
                    assigns = [ast.get_source_segment(text, n.value) for n in ast.walk(tree)
                               if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == src
                                                                    for t in n.targets)]
                    if not assigns or not all('["trust_remote_code"]' in a or "trust_remote_code" in a
                                              and "model" in a for a in assigns):
                        problems.append(f"{rel}:{line}: {name}(trust_remote_code={src}) not from params: {assigns}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults) \
                    + list(node.args.kw_defaults)
                for a, d in zip(args, defaults):
                    if a.arg == "trust_remote_code" and not (isinstance(d, ast.Constant) and d.value is False):
                        problems.append(f"{rel}:{node.lineno}: {node.name}(trust_remote_code=...) default is not False")
    assert not problems, "\n".join(problems)


EVIL = textwrap.dedent('''
    from pathlib import Path
    Path({sentinel!r}).write_text("remote code ran")
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    class EvilModel(LlamaForCausalLM):
        pass
''')

LOAD = textwrap.dedent('''
    import sys
    from pathlib import Path
    from drsft.models import load_model, load_tokenizer
    model, sentinel = sys.argv[1], Path(sys.argv[2])
    load_tokenizer(model)                      # the defaults, as every stage gets them from params (false)
    load_model(model)
    print("sentinel after the default load:", sentinel.exists())
    try:                                       # positive control: trusted, the folder's code runs
        load_model(model, trust_remote_code=True)
    except Exception as exc:  # EvilConfig does not exist: it fails after the code ran; only the sentinel matters
        print("trusted load failed:", type(exc).__name__)
''')


def test_remote_code_in_a_model_folder_does_not_run_by_default(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    sentinel = tmp_path / "REMOTE_CODE_RAN"
    (model / "evil.py").write_text(EVIL.format(sentinel=str(sentinel)), encoding="utf-8")
    conf = json.loads((model / "config.json").read_text(encoding="utf-8"))
    conf["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(conf), encoding="utf-8")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", LOAD, str(model), str(sentinel)], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sentinel after the default load: False" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert sentinel.exists(), (proc.stdout, proc.stderr[-2000:])  # the control: the sentinel proves the test

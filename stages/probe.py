"""probe: the world's properties, measured on the base model before any fine-tuning.

Reads ``data/prepare/train.jsonl`` and ``models/base``; params ``prepare.probe``, ``prompt``,
``model`` and ``verify.mode``. Writes ``metrics/probe.json``: ``world`` (drsft.toy.probe: solve rates,
unsolved share, guided solve rates, expert vs own NLL, headroom families, and ``checks``, one flag
per property). ``prepare.probe.enabled: auto`` probes the embedded toy model only (a hub model on
CPU would be far too slow); ``true``/``false`` force it. A failed check is a warning, not an error:
the pipeline still runs, and the flags say what the world lacks.

Its own stage, after ``prepare``, so that editing the sampler, verifier or scorer reruns the probe
(seconds) and not the pretraining of the base model (minutes).
"""


import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.io import read_jsonl, write_json, write_run_info
from drsft.params import load_params, section
from drsft.stage import clear_errors, log, preflight


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--problems", default="data/prepare/train.jsonl", show_default=True)
@click.option("--model", "model_dir", default="models/base", show_default=True)
@click.option("--metrics", default="metrics/probe.json", show_default=True)
@clear_errors
def main(params_path, problems, model_dir, metrics):
    """Measure the world's properties (prepare.probe) on the base model and the training problems."""
    params = load_params(params_path)
    pr, model_cfg = section(params, "prepare")["probe"], section(params, "model")
    preflight([metrics])
    enabled, base = pr["enabled"], str(model_cfg["base"])  # "auto" | true | false
    if not (enabled is True or (enabled == "auto" and base == "toy")):
        write_json(metrics, {"world": {"skipped": f"probe disabled (prepare.probe.enabled={enabled}, "
                                                  f"model.base={base!r})"}})
        log.info("probe: skipped (prepare.probe.enabled=%s, model.base=%r)", enabled, base)
        return
    from drsft.toy.probe import probe_world

    cfg = {k: v for k, v in pr.items() if k not in ("enabled", "verify_workers", "verify_timeout_s")}
    world = probe_world(model_dir, read_jsonl(problems), section(params, "prompt"), cfg,
                        verify_workers=int(pr["verify_workers"]), verify_timeout_s=float(pr["verify_timeout_s"]),
                        trust_remote_code=model_cfg["trust_remote_code"], log=log.info,
                        verify_mode=section(params, "verify")["mode"])
    bad = [k for k, ok in world["checks"].items() if not ok]
    if bad:
        log.warning("probe: world property check(s) failed: %s", bad)
    write_run_info(metrics, {"seconds": world.pop("seconds")})
    write_json(metrics, {"world": world})


if __name__ == "__main__":
    main()

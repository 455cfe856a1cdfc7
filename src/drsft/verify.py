r"""The answer verifier: is a model response's final ``\boxed{}`` answer equivalent to the reference?

Equivalence is decided by math-verify (``math_verify.parse`` + ``math_verify.verify``) with
:class:`~math_verify.LatexExtractionConfig` **only**. The response's last ``\boxed{...}`` (or ``\fbox{}``)
is extracted here (:func:`extract_boxed`), wrapped as inline math ``$...$`` and parsed; the reference
answer is wrapped and parsed the same way. ``verify(gold, pred)`` is called with the reference as gold.

Verdict reasons: ``ok`` (equivalent), ``wrong`` (parsed, not equivalent), ``no_answer`` (no complete
box), ``timeout`` (parse or comparison ran past the bound, or the worker doing it hung or died),
``parse_error`` (the box holds nothing math-verify can turn into a sympy object, is empty or longer
than :data:`MAX_ANSWER_CHARS`, or the parser stack raised).

Untrusted text: what was checked in the installed sources
----------------------------------------------------------
math-verify 0.9.0, latex2sympy2_extended 1.11.0, sympy 1.14.0, antlr4-python3-runtime 4.9.3
(``.venv/lib/python3.11/site-packages``), searched for ``sympify``/``parse_expr``/``eval``/``exec``:

* ``math_verify/parser.py`` imports ``sympy.parsing.parse_expr`` and calls it (``parse_expr_cached``)
  only from ``extract_expr``, i.e. only for :class:`ExprExtractionConfig` matches: that path runs
  sympy's ``parse_expr`` -- which ``eval``\ s generated Python -- on raw text. It is never enabled here:
  every ``parse`` call passes ``extraction_config=(LatexExtractionConfig(),)``.
* ``latex2sympy2_extended/latex2sympy2.py`` calls ``parse_expr`` only on caller-given
  ``variable_values`` (math-verify passes none). It builds sympy objects from the ANTLR parse tree;
  ``sympy.Number(text)`` is called on NUMBER / E_NOTATION / PERCENT_NUMBER tokens (numerals only: the
  lexer admits digits, separators, a decimal point and an exponent), ``sympy.Symbol(name)`` /
  ``sympy.Function(name)`` on letters and ``\operatorname``/``\text`` names (a name, never evaluated),
  and ``getattr(sympy_module, name)`` only for names from fixed grammar alternatives (trig, hyperbolic,
  max/min, gcd/lcm).
* ``latex2sympy2_extended/sets.py`` and ``logic.py`` ``sympify`` their arguments, which are sympy
  objects produced by the converter (``sympify`` of a Basic is the identity), never strings.
* ``math_verify/grader.py`` has no string parsing: it compares parsed trees (``str()``, ``simplify``,
  ``evalf``, ``doit``) -- costly on huge expressions, which is what the time bound is for.

``tests/reliability/test_untrusted.py`` feeds ``__import__('os').system(...)``, ``eval``, ``exec``, ``lambda`` and
dunder-attribute strings through the whole path and checks that no side effect happened.

Time bounds
-----------
math-verify's own timeout (``math_verify.utils.timeout``) uses ``signal.signal`` + ``signal.alarm``:
``signal.signal`` raises ``ValueError`` outside the main thread of the main interpreter (math-verify
turns that into an error, so ``parse``/``verify`` fail in any thread), ``alarm`` only has whole seconds,
and the ``TimeoutException`` it raises is swallowed by ``parse``/``verify``, which then return ``[]`` /
``False`` -- a timeout would be indistinguishable from a parse failure or a wrong answer. So its timeout
is always disabled (``parsing_timeout=None``, ``timeout_seconds=None``) and the bound is ours:

* main thread (a plain process, or a pool worker -- workers run the call in their main thread):
  ``signal.setitimer(ITIMER_REAL, timeout_s)`` with a handler raising :class:`VerifyTimeout`, a
  ``BaseException`` that math-verify's ``except Exception`` handlers let through. CPython 3.11 checks
  for signals inside long-integer power loops, so e.g. ``9^{9^{9^{9}}}`` is interrupted too.
* any other thread: signals cannot be used, so the call is delegated to a helper worker process
  (started once, reused, serialised by a lock), whose main thread applies the timer and which the
  caller kills and replaces if it does not answer within the process-level bound.
* :func:`verify_batch` runs items in worker processes (their main thread); a worker silent past
  ``timeout_s + grace`` (a hang in C code that never returns to the interpreter, e.g. a pathological
  regex) or one that dies is killed and replaced; its in-flight item gets a ``timeout`` verdict and its
  other items are re-queued. Cheap checks (no box, over-long answer, identical strings) are decided in
  the parent without a worker.

Known limitation of the installed stack (reported): with antlr4-python3-runtime 4.9.3,
latex2sympy2_extended 1.11.0's generated 4.9.3 parser lacks ``AtomContext.FUNC_GAMMA``, so any percentage
*inside* math (``10\%``) fails to parse. A trailing ``\%`` / ``%`` is therefore moved outside the math
delimiters (``$10$\%``), where math-verify's own percent handling applies ``convert_to_pct``; by
math-verify's rules ``10\%`` then equals ``10`` (integer percentages are compared without the percent)
and ``0.1`` (numerically), and ``20\%`` does not equal ``10`` (tested in tests/test_verify.py). One
trailing ``.``/``,``/``;`` inside the box (``\boxed{104.}``) is dropped too: math-verify cannot parse it.

Shortcuts that do not change math-verify's verdict (tested against it): identical answer strings are
``ok``; plain integers (``42``, ``-7``, ``1,000``) are compared as integers, which is what math-verify does
with two sympy Integers; two closed real numbers that differ by more than 1e-5 (math-verify rounds
floats to 6 decimals) are ``wrong`` without its ``simplify`` fallback. Parses and reasons are cached
per process, so a reference is parsed once per worker and repeated answers cost nothing.

Processes: workers start through multiprocessing's ``forkserver`` (``spawn`` where it is missing), so
as with any spawn-style pool the calling script must guard its entry point with
``if __name__ == "__main__":`` -- its module is imported in each worker.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as _mp_wait
from typing import Any

log = logging.getLogger(__name__)

REASONS = ("ok", "wrong", "no_answer", "timeout", "parse_error")
MAX_ANSWER_CHARS = 2000  # a boxed answer longer than this is a parse_error without parsing
_PARSE_CACHE_SIZE = 8192
_REASON_CACHE_SIZE = 32768
_CHUNK_ITEMS = 32
_CHUNK_CHARS = 16_000
_STARTUP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str  # ok | wrong | no_answer | timeout | parse_error
    extracted: str | None


class VerifyTimeout(BaseException):
    """Raised by our interval timer; a BaseException so math-verify's ``except Exception`` lets it through."""


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _match_brace(text: str, start: int) -> int | None:
    r"""Index of the ``}`` closing the group whose content starts at ``start`` (after ``{``), or None.

    A backslash escapes the next character, so ``\{`` / ``\}`` (and ``\\``) do not count.
    """
    depth = 1
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _unwrap_boxes(content: str) -> str:
    r"""Replace every ``\boxed{X}`` / ``\fbox{X}`` inside ``content`` by ``X`` (nested boxes)."""
    for _ in range(64):  # each pass removes at least one box; bounded anyway
        m = _BOX_START.search(content)
        if m is None:
            return content
        end = _match_brace(content, m.end())
        if end is None:
            return content
        content = content[:m.start()] + content[m.end():end] + content[end + 1:]
    return content


def extract_boxed(text: str) -> str | None:
    r"""Content of the last top-level ``\boxed{...}`` / ``\fbox{...}`` in ``text``.

    Braces must balance (escaped ``\{``/``\}`` excluded); boxes nested inside the chosen box are
    unwrapped (``\boxed{a+\boxed{b}}`` gives ``a+b``). Returns None when there is no box, or when the last
    box never closes. Linear in ``len(text)``. A braceless ``\boxed 5`` is not an answer.
    """
    if not text or ("\\boxed" not in text and "\\fbox" not in text):
        return None
    last: str | None = None
    pos = 0
    for m in _BOX_START.finditer(text):
        if m.start() < pos:
            continue  # inside the previous top-level box
        end = _match_brace(text, m.end())
        if end is None:
            return None  # the last box is unbalanced
        last = text[m.end():end]
        pos = end + 1
    return None if last is None else _unwrap_boxes(last).strip()


MODES = ("boxed", "paper")
_ANSWER_IS = ("he answer is", "final answer is")  # the paper toolkit's phrases, in its order
_NUMBER = re.compile(r"-?\d*\.?\d+")


def extract_answer(text: str, mode: str = "boxed") -> str | None:
    r"""The final answer of a response, by ``verify.mode``.

    ``boxed``: the last ``\boxed{}`` (:func:`extract_boxed`), else None. ``paper``: the extraction
    order of the paper's evaluation toolkit (``math_evaluation/parser.py`` ``extract_answer``): the last
    box; else the text after the last "the answer is" / "final answer is"; else the last number in
    the response (commas removed); line breaks dropped and one leading ``:`` and trailing ``.``/``/``
    removed. Plain string operations: the text is never evaluated.
    """
    if mode == "boxed":
        return extract_boxed(text)
    if mode != "paper":
        raise ValueError(f"verify.mode must be one of {MODES}, got {mode!r}")
    text = text or ""
    pred = extract_boxed(text)
    if pred is None:
        for phrase in _ANSWER_IS:
            if phrase in text:
                pred = text.split(phrase)[-1].strip()
                break
        else:
            numbers = _NUMBER.findall(text.replace(",", ""))
            pred = numbers[-1] if numbers else None
    if pred is None:
        return None
    pred = re.sub(r"\n\s*", "", pred).strip()
    if pred.startswith(":"):
        pred = pred[1:]
    while True:  # "$\frac{1}{2}$." -> \frac{1}{2}
        stripped = pred.strip().rstrip("./").strip().strip("$")
        if stripped == pred:
            return pred
        pred = stripped


_PAPER_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")


def _paper_number(s: str) -> float | None:
    r"""A plain decimal number (``1,000``, ``-2.5``, ``.5``, a trailing ``%``/``\%`` ignored), else None."""
    n = _norm(s)
    n = n[:-2] if n.endswith("\\%") else n[:-1] if n.endswith("%") else n
    if not n or len(n) > 40 or not any(c.isdigit() for c in n) or not _PAPER_NUMBER.fullmatch(n):
        return None
    return float(n.replace(",", ""))


def _paper_numeric(extracted: str, reference: str) -> Verdict | None:
    """The paper toolkit's numeric rule (``grader.math_equal``): two plain numbers are equal when
    ``isclose(reference x f, prediction, rel_tol=1e-4)`` for f in 1/100, 1, 100 (percent forms)."""
    a, b = _paper_number(extracted), _paper_number(reference)
    if a is None or b is None:
        return None
    ok = any(math.isclose(b * f, a, rel_tol=1e-4) for f in (0.01, 1.0, 100.0))
    return Verdict(ok, "ok" if ok else "wrong", extracted)


# --------------------------------------------------------------------------------------------------
# Parsing and comparison (math-verify, LaTeX only)
# --------------------------------------------------------------------------------------------------

_mv = None  # (parse, verify, config) once imported


def _math_verify():
    global _mv
    if _mv is None:
        import math_verify.grader as grader
        import math_verify.parser as parser
        from math_verify import LatexExtractionConfig, parse, verify

        # We always pass timeout=None (see the module docstring); silence the one-time warning about it.
        parser.TIMEOUT_WARNING_SHOWN = True
        grader.TIMEOUT_WARNING_SHOWN = True
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _mv = (parse, verify, (LatexExtractionConfig(),))
    return _mv


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_TRAILING_PCT = re.compile(r"^(.*?\S)\s*\\?%$", re.DOTALL)
_WS = re.compile(r"\s+")
_TRAILING_PUNCT = re.compile(r"(?<=\S)\s*(?:\\[.,;]|[.,;])$")


def _wrap(answer: str) -> str | None:
    """An extracted answer as the inline math math-verify's LaTeX extraction expects; None if empty."""
    s = _UNESCAPED_DOLLAR.sub(" ", answer.replace("\n", " ")).strip()
    s = _TRAILING_PUNCT.sub("", s)  # "104." / "x = 5," : sentence punctuation, which math-verify cannot parse
    if not s:
        return None
    m = _TRAILING_PCT.match(s)
    if m:  # see "Known limitation" in the module docstring
        return f"${m.group(1)}$\\%"
    return f"${s}$"


def _parse(latex_math: str) -> list:
    parse, _, config = _math_verify()
    return parse(latex_math, extraction_config=config, parsing_timeout=None,
                 fallback_mode="first_match", extraction_mode="any_match", raise_on_error=False)


def _has_expr(parsed: Sequence) -> bool:
    from sympy import Basic, MatrixBase

    return any(isinstance(x, (Basic, MatrixBase)) for x in parsed)


_TIMED_OUT = object()
_PARSE_FAILED = object()


class _LRU:
    """A small per-process LRU map (parsed answers, reasons)."""

    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict = OrderedDict()

    def get(self, key):
        hit = self.data.get(key)
        if hit is not None:
            self.data.move_to_end(key)
        return hit

    def put(self, key, value) -> None:
        self.data[key] = value
        while len(self.data) > self.size:
            self.data.popitem(last=False)


_parse_cache = _LRU(_PARSE_CACHE_SIZE)  # wrapped answer -> tuple | _PARSE_FAILED | _TIMED_OUT
_reason_cache = _LRU(_REASON_CACHE_SIZE)  # (extracted, reference) -> reason


def _parsed(answer: str):
    """math-verify's parse of an answer, once per process (references are parsed once per worker).

    A parse that timed out or failed is remembered too, so n samples of one problem pay for it once.
    """
    wrapped = _wrap(answer)
    if wrapped is None:
        return _PARSE_FAILED
    hit = _parse_cache.get(wrapped)
    if hit is not None:
        return hit
    try:
        value = tuple(_parse(wrapped)) or _PARSE_FAILED
    except VerifyTimeout:
        _parse_cache.put(wrapped, _TIMED_OUT)
        raise
    except Exception:  # noqa: BLE001 - any parser failure is a verdict
        value = _PARSE_FAILED
    _parse_cache.put(wrapped, value)
    return value


def _norm(s: str) -> str:
    return _WS.sub("", _UNESCAPED_DOLLAR.sub("", s)).replace("{,}", ",")


_PLAIN_INT = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)")


def _plain_int(s: str) -> int | None:
    n = _norm(s)
    if len(n) > 40 or not _PLAIN_INT.fullmatch(n):
        return None
    return int(n.replace(",", ""))


def _quick(extracted: str | None, reference: str) -> Verdict | None:
    """Verdicts that need no parsing (decided in the caller's process).

    Plain integers (``42``, ``-7``, ``1,000``) are compared as integers: math-verify parses both to
    sympy Integers and compares them exactly, so this is its verdict without the ANTLR parse.
    """
    if extracted is None:
        return Verdict(False, "no_answer", None)
    if not extracted.strip() or len(extracted) > MAX_ANSWER_CHARS:
        return Verdict(False, "parse_error", extracted)
    if _norm(extracted) == _norm(reference) and _norm(reference):
        return Verdict(True, "ok", extracted)  # identical strings: equivalent whatever the parse
    a, b = _plain_int(extracted), _plain_int(reference)
    if a is not None and b is not None:
        return Verdict(a == b, "ok" if a == b else "wrong", extracted)
    return None


def _closed_number(x):
    """x evaluated to 30 digits if it is a closed real numeric expression math-verify has no special rule
    for (no symbols, percentages, relations, sets, tuples, matrices); else None."""
    from sympy import Expr, Float, Integer, Rational, UnevaluatedExpr
    from sympy.matrices import MatrixBase
    from sympy.matrices.expressions import MatrixExpr

    if not isinstance(x, Expr) or isinstance(x, (MatrixBase, MatrixExpr)) or x.free_symbols \
            or x.has(UnevaluatedExpr):
        return None
    v = x.evalf(30)
    if isinstance(v, (Float, Integer, Rational)) and v.is_finite:
        return v
    return None


def _clearly_different(gold: Sequence, pred: Sequence) -> bool:
    """True when gold and pred are closed real numbers that differ beyond any rounding math-verify
    applies (6 decimals for floats): then math-verify's verdict is ``False`` and its costly
    ``simplify`` fallback can be skipped. Anything else is left to math-verify."""
    from sympy import Basic, MatrixBase

    g = [x for x in gold if isinstance(x, (Basic, MatrixBase))]
    p = [x for x in pred if isinstance(x, (Basic, MatrixBase))]
    if len(g) != 1 or len(p) != 1:
        return False
    gs = [x.strip() for x in gold if isinstance(x, str)]
    if any(isinstance(x, str) and x.strip() in gs for x in pred):
        return False  # math-verify would also compare the normalised strings
    a, b = _closed_number(g[0]), _closed_number(p[0])
    if a is None or b is None:
        return False
    diff = abs(a - b)
    scale = max(abs(a), abs(b), 1)
    return bool(diff > 1e-5 and diff / scale > 1e-20)


def _compare(extracted: str, reference: str) -> str:
    """Reason for an extracted answer vs the reference; may raise VerifyTimeout (call under a bound)."""
    gold = _parsed(reference)
    if gold is _TIMED_OUT:
        return "timeout"
    if gold is _PARSE_FAILED:
        return "parse_error"
    pred = _parsed(extracted)
    if pred is _TIMED_OUT:
        return "timeout"
    if pred is _PARSE_FAILED:
        return "parse_error"
    try:
        if _clearly_different(gold, pred):
            return "wrong"
    except Exception:  # noqa: BLE001 - the shortcut is optional; math-verify decides below
        pass
    _, verify, _ = _math_verify()
    try:
        same = verify(list(gold), list(pred), timeout_seconds=None, raise_on_error=False)
    except Exception:  # noqa: BLE001
        same = False
    if same:
        return "ok"
    return "wrong" if _has_expr(pred) else "parse_error"


class _time_bound:
    """Interval timer raising VerifyTimeout in the main thread; restores any previous SIGALRM state."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)

    def __enter__(self):
        def handler(signum, frame):
            raise VerifyTimeout()

        self.t0 = time.monotonic()
        old = signal.signal(signal.SIGALRM, handler)
        self.old_handler = signal.SIG_DFL if old is None else old
        self.old_timer = signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 1e-3))
        return self

    def __exit__(self, *exc):
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        except VerifyTimeout:  # the one-shot timer fired on the way out: the work is done anyway
            signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old_handler)
        delay, interval = self.old_timer
        if delay > 0:  # someone else's timer was running: re-arm what is left of it
            left = delay - (time.monotonic() - self.t0)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), interval)
        return False


def _verify_extracted_main_thread(extracted: str, reference: str, timeout_s: float) -> str:
    key = (extracted, reference)
    reason = _reason_cache.get(key)
    if reason is not None:
        return reason
    try:
        with _time_bound(timeout_s):
            reason = _compare(extracted, reference)
    except VerifyTimeout:
        reason = "timeout"
    except Exception:  # noqa: BLE001 - a verdict, never a crash (RecursionError, MemoryError, ...)
        reason = "parse_error"
    _reason_cache.put(key, reason)
    return reason


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _quick_mode(extracted: str | None, reference: str, mode: str) -> Verdict | None:
    quick = _quick(extracted, reference)
    if quick is None and mode == "paper":
        quick = _paper_numeric(extracted, reference)
    return quick


def verify_answer(response: str, reference: str, timeout_s: float = 5.0, mode: str = "boxed") -> Verdict:
    """Verdict for one response against one reference answer, bounded by ``timeout_s`` seconds.

    ``mode``: ``boxed`` or ``paper`` (:func:`extract_answer`; ``paper`` also applies the paper
    toolkit's numeric tolerance before math-verify). Safe in any thread: off the main thread the
    comparison runs in a helper process (see module doc).
    """
    extracted = extract_answer(response or "", mode)
    quick = _quick_mode(extracted, reference, mode)
    if quick is not None:
        return quick
    if _on_main_thread():
        reason = _verify_extracted_main_thread(extracted, reference, timeout_s)
    else:
        reason = _thread_helper_run(extracted, reference, timeout_s)
    return Verdict(reason == "ok", reason, extracted)


# --------------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------------

def _worker_main(conn, timeout_s: float) -> None:  # pragma: no cover - runs in a child process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        _math_verify()
        conn.send(("ready", os.getpid()))
        while True:
            try:
                chunk = conn.recv()
            except EOFError:
                return
            if chunk is None:
                return
            for idx, extracted, reference in chunk:
                conn.send((idx, _verify_extracted_main_thread(extracted, reference, timeout_s)))
    except (BrokenPipeError, EOFError, OSError):
        return


def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # Children fork from a clean single-threaded server with math-verify already imported, so
        # replacing a killed worker costs milliseconds. Best effort: ignored if the server already runs.
        try:
            ctx.set_forkserver_preload(["drsft.verify"])
        except Exception:  # noqa: BLE001
            pass
        return ctx
    return mp.get_context("spawn")


class _Worker:
    def __init__(self, ctx, timeout_s: float):
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, timeout_s), daemon=True, name="drsft-verify")
        self.proc.start()
        child.close()
        self.conn = parent
        self.pending: deque = deque()  # (idx, extracted, reference) sent, no answer yet
        self.ready = False
        self.started = time.monotonic()
        self.last = self.started

    def send(self, chunk: list) -> None:
        self.conn.send(chunk)
        if not self.pending:
            self.last = time.monotonic()  # the clock of the first item starts now
        self.pending.extend(chunk)

    def stop(self, kill: bool = False) -> None:
        try:
            if not kill and self.proc.is_alive():
                try:
                    self.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
                self.proc.join(timeout=2.0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5.0)
        finally:
            try:
                self.conn.close()
            except OSError:
                pass
            try:
                self.proc.close()
            except (ValueError, AttributeError):
                pass


class _Pool:
    """A fixed number of verifier processes; hung or dead workers are killed and replaced."""

    def __init__(self, workers: int, timeout_s: float):
        self.n = max(1, int(workers))
        self.timeout_s = float(timeout_s)
        self.bound = self.timeout_s + max(1.0, 0.5 * self.timeout_s)  # per item, after the worker is ready
        self.ctx = _context()
        self.workers: list[_Worker] = []
        self.replaced = 0
        self._startup_failures = 0

    def _spawn(self) -> _Worker:
        return _Worker(self.ctx, self.timeout_s)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []

    def run(self, items: list[tuple[int, str, str]], on_done: Any = None) -> dict[int, str]:
        """Reasons for ``(idx, extracted, reference)`` items; every item gets one. ``on_done(n)``
        hears of every ``n`` items decided (for a progress bar)."""
        out: dict[int, str] = {}
        if not items:
            return out
        reported = 0
        queue: deque[list] = deque(_chunks(items))
        while len(self.workers) < min(self.n, len(queue)):
            self.workers.append(self._spawn())
        while len(out) < len(items):
            for w in self.workers:  # keep each ready worker at most two chunks ahead
                while w.ready and queue and len(w.pending) < _CHUNK_ITEMS:
                    chunk = queue.popleft()
                    try:
                        w.send(chunk)
                    except (BrokenPipeError, OSError):
                        queue.appendleft(chunk)
                        break  # noticed as a dead worker below
            conns = {w.conn: w for w in self.workers}
            for conn in _mp_wait(list(conns), timeout=0.05):
                w = conns[conn]
                try:
                    while conn.poll():
                        msg = conn.recv()
                        w.last = time.monotonic()
                        if msg[0] == "ready":
                            w.ready = True
                            self._startup_failures = 0
                            continue
                        idx, reason = msg
                        if w.pending and w.pending[0][0] == idx:
                            w.pending.popleft()
                        out[idx] = reason
                except (EOFError, OSError):
                    self._replace(w, queue, out, "died")
            now = time.monotonic()
            for w in list(self.workers):
                if w.ready and w.pending and now - w.last > self.bound:
                    self._replace(w, queue, out, f"silent for {now - w.last:.1f}s")
                elif not w.ready and (now - w.started > _STARTUP_TIMEOUT_S or not w.proc.is_alive()):
                    self._replace(w, queue, out, "did not start")
                elif w.ready and not w.proc.is_alive() and w.pending:
                    self._replace(w, queue, out, "died")
            if on_done is not None and len(out) > reported:
                on_done(len(out) - reported)
                reported = len(out)
        return out

    def _replace(self, w: _Worker, queue: deque, out: dict, why: str) -> None:
        if w not in self.workers:
            return
        pending = [it for it in w.pending if it[0] not in out]
        if not w.ready:
            self._startup_failures += 1
            if self._startup_failures > 3:
                raise RuntimeError("verifier worker processes fail to start (see stderr)")
        w.stop(kill=True)
        self.workers.remove(w)
        self.replaced += 1
        if pending and w.ready:
            idx = pending[0][0]
            out[idx] = "timeout"  # the item it was working on
            log.warning("verify worker %s on item %d: killed, verdict 'timeout'", why, idx)
            pending = pending[1:]
        if pending:
            queue.appendleft(pending)
        if queue or any(x.pending for x in self.workers):
            self.workers.append(self._spawn())


def _chunks(items: list[tuple[int, str, str]]) -> list[list]:
    """Chunks that keep the items of one reference together (so it is parsed once, by one worker).

    A chunk holds at most ``_CHUNK_ITEMS`` items and about ``_CHUNK_CHARS`` characters (two chunks
    in flight always fit a pipe buffer); only a reference with more items than that is split.
    """
    groups: dict[str, list] = {}
    for it in items:
        groups.setdefault(it[2], []).append(it)
    chunks: list[list] = []
    cur: list = []
    chars = 0
    for group in groups.values():
        size = sum(len(e) + len(r) for _, e, r in group)
        if cur and (len(cur) + len(group) > _CHUNK_ITEMS or chars + size > _CHUNK_CHARS):
            chunks.append(cur)
            cur, chars = [], 0
        for it in group:
            n = len(it[1]) + len(it[2])
            if cur and (len(cur) >= _CHUNK_ITEMS or chars + n > _CHUNK_CHARS):
                chunks.append(cur)
                cur, chars = [], 0
            cur.append(it)
            chars += n
    if cur:
        chunks.append(cur)
    return chunks


_helper_lock = threading.Lock()
_helper: _Pool | None = None


def _thread_helper_run(extracted: str, reference: str, timeout_s: float) -> str:
    """Off the main thread: run in the (shared, lazily started) helper process, which has a main thread."""
    global _helper
    if mp.current_process().daemon:  # a daemonic process may not start children: no bound available
        try:
            return _compare(extracted, reference)
        except Exception:  # noqa: BLE001
            return "parse_error"
    with _helper_lock:
        if _helper is None or _helper.timeout_s != float(timeout_s):
            if _helper is not None:
                _helper.close()
            _helper = _Pool(1, timeout_s)
        return _helper.run([(0, extracted, reference)])[0]


@atexit.register
def _close_helper() -> None:
    if _helper is not None:
        _helper.close()


def verify_batch(pairs: Sequence[tuple[str, str]], workers: int = 2, timeout_s: float = 5.0,
                 mode: str = "boxed", progress: bool = False) -> list[Verdict]:
    """Verdicts for ``(response, reference)`` pairs, in order; ``mode`` as in :func:`verify_answer`.

    ``workers > 1``: a pool of that many processes (references parsed once per worker, items of one
    reference sent together); a worker past ``timeout_s + grace`` or dead is killed and replaced and its
    in-flight item gets ``timeout``. ``workers <= 1``: in this process, one :func:`verify_answer` per pair.
    ``progress``: a tqdm bar over the answers that need math-verify (the rest are decided at once).
    """
    extracted = [extract_answer(resp or "", mode) for resp, _ in pairs]
    verdicts: list[Verdict | None] = [_quick_mode(e, ref, mode) for e, (_, ref) in zip(extracted, pairs)]
    # identical (answer, reference) pairs -- n samples agreeing on one answer -- are decided once
    unique: dict[tuple[str, str], int] = {}
    for i, v in enumerate(verdicts):
        if v is None:
            unique.setdefault((extracted[i], pairs[i][1]), i)
    todo = [(i, e, ref) for (e, ref), i in unique.items()]
    reasons: dict[int, str] = {}
    if todo:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="verify", unit="answer", dynamic_ncols=True)
        try:
            if workers <= 1 or mp.current_process().daemon:
                for i, e, ref in todo:
                    reasons[i] = (_verify_extracted_main_thread(e, ref, timeout_s) if _on_main_thread()
                                  else _thread_helper_run(e, ref, timeout_s))
                    if bar is not None:
                        bar.update(1)
            else:
                pool = _Pool(min(int(workers), len(todo)), timeout_s)
                try:
                    reasons = pool.run(todo, on_done=bar.update if bar is not None else None)
                finally:
                    pool.close()
        finally:
            if bar is not None:
                bar.close()
    for i, v in enumerate(verdicts):
        if v is None:
            reason = reasons[unique[(extracted[i], pairs[i][1])]]
            verdicts[i] = Verdict(reason == "ok", reason, extracted[i])
    return verdicts  # type: ignore[return-value]

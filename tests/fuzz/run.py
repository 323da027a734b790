"""`make fuzz`: coverage-guided fuzzing (atheris, libFuzzer) of the two framing targets, time-boxed.

Theory of operation: each target runs in its own child process for half the time. A child first
puts a copy of proxy/*.py ahead of the compiled modules on sys.path (atheris instruments Python
bytecode; mypyc's C extensions and httptools' llhttp give it no coverage), imports the proxy under
atheris' instrumentation and fuzzes with .fuzz/<target>/corpus as the growing corpus, seeded from the
regression corpus and the generators. Crashing inputs are saved as .fuzz/<target>/crash-*.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".fuzz"


def _seed(target: str, corpus: Path) -> None:
    """Seed an empty corpus with the regression corpus and generated inputs."""
    from tests.corpus.corpus import request_cases, response_cases
    from tests.framing import generate
    from tests.fuzz.harnesses import encode_request, encode_response

    if any(corpus.iterdir()):
        return
    seeds: list[bytes] = []
    if target == "requests":
        seeds += [encode_request(case.data) for case in request_cases() if len(case.data) < 8000]
        seeds += [encode_request(generate.request_stream(random.Random(n))) for n in range(200)]
    else:
        seeds += [encode_response(c.upstream, c.method == "HEAD", c.eof) for c in response_cases()]
        for n in range(200):
            case = generate.upstream_case(random.Random(n))
            seeds.append(encode_response(case.response, case.method == b"HEAD", case.eof))
    for index, seed in enumerate(seeds):
        (corpus / f"seed-{index:04d}").write_bytes(seed)


def child(target: str, seconds: int) -> None:
    import atheris

    pure = Path(tempfile.mkdtemp(prefix="uvgate-fuzz-"))
    shutil.copytree(ROOT / "proxy", pure / "proxy", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    sys.path.insert(0, str(pure))
    sys.path.insert(1, str(ROOT))
    with atheris.instrument_imports(include=["proxy", "tests.framing"]):
        import proxy.http1.protocol
        from tests.fuzz.harnesses import TARGETS
    assert "uvgate-fuzz-" in (proxy.http1.protocol.__file__ or ""), "fuzzing must run the pure-Python sources"
    corpus = OUT / target / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    _seed(target, corpus)
    argv = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={OUT / target}/",
        "-max_len=8192",
        "-timeout=20",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, TARGETS[target])
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=300, help="total, shared by the targets")
    parser.add_argument("--target", choices=["requests", "responses"], action="append")
    parser.add_argument("--child", choices=["requests", "responses"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seconds)
        return 0
    targets = args.target or ["requests", "responses"]
    share = max(10, args.seconds // len(targets))
    failed = []
    for target in targets:
        (OUT / target).mkdir(parents=True, exist_ok=True)
        log = OUT / target / "log"
        print(f"fuzzing {target} for {share} s (log: {log})", flush=True)
        started = time.monotonic()
        with log.open("wb") as out:
            command = [sys.executable, "-m", "tests.fuzz.run", "--child", target, "--seconds", str(share)]
            # libFuzzer stops itself at -max_total_time; the timeout only guards against a hang.
            code = subprocess.run(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=share + 300
            ).returncode
        lines = log.read_text(errors="replace").splitlines()
        stats = [line for line in lines if line.startswith(("#", "stat::", "==", "INFO: seed"))][-12:]
        print("\n".join(stats))
        print(f"{target}: exit {code} after {time.monotonic() - started:.0f} s")
        if code != 0:
            failed.append(target)
    crashes = sorted(OUT.glob("*/crash-*"))
    if crashes:
        print("crashing inputs:\n" + "\n".join(f"  {path}" for path in crashes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The container build (Dockerfile, docker/ scripts, constraints.txt, .dockerignore), without a GPU.

The Dockerfile is parsed the way buildah 1.28 / podman 4.3 (Debian) parse it: no heredocs (those need
BuildKit or buildah >= 1.33; the lines inside a heredoc become instructions, e.g. a Python
``from x import y`` line is read as a FROM with 4 arguments). The freeze guard and the self-check
scripts run here for real.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # comment lines inside a continuation are skipped, as the classic parser does
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def test_dockerfile_parses_like_buildah_1_28():
    for word, args in dockerfile():
        assert word in INSTRUCTIONS, f"not a Dockerfile instruction (a heredoc line?): {word} {args[:60]}"
        assert not re.search(r"<<-?\s*['\"]?\w+", args), f"heredoc needs BuildKit / buildah>=1.33: {args[:60]}"
        if word == "FROM":
            n = len(args.split())
            assert n in (1, 3), f"FROM requires either one argument, or three: FROM {args}"


def test_shell_pipelines_fail_loudly():
    for word, args in dockerfile():
        if word == "RUN" and "|" in args.replace("||", ""):
            assert "pipefail" in args, f"a pipe in RUN without pipefail: {args[:80]}"
    for script in DOCKER.glob("*.sh"):
        assert "set -euo pipefail" in script.read_text(), script


def _fake_dist(site: Path, name: str, version: str, direct_url: str = "") -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if direct_url:
        (info / "direct_url.json").write_text(f'{{"url": "{direct_url}", "dir_info": {{}}}}')


def _run_guard(site: Path, out: Path, isolated: bool) -> subprocess.CompletedProcess:
    flags = ["-S"] if isolated else []
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *flags, str(DOCKER / "keep_gpu_stack.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_freeze_guard_keeps_path_installed_builds(tmp_path):
    """NGC's torch/TE/apex are installed from paths (`torch @ file:///...`): they must be pinned too."""
    site = tmp_path / "site"
    _fake_dist(site, "torch", "2.9.0a0+145a3a7bda.nv25.11", "file:///opt/pytorch/pytorch")
    _fake_dist(site, "transformer_engine", "2.9.0+70f53666", "file:///opt/transformer_engine")
    _fake_dist(site, "apex", "0.1", "file:///opt/pytorch/apex")
    _fake_dist(site, "numpy", "1.26.4")
    _fake_dist(site, "requests", "2.32.0")
    out = tmp_path / "keep.txt"
    proc = _run_guard(site, out, isolated=True)
    assert proc.returncode == 0, proc.stderr
    kept = out.read_text().split()
    assert kept == ["apex==0.1", "numpy==1.26.4", "torch==2.9.0a0+145a3a7bda.nv25.11",
                    "transformer-engine==2.9.0+70f53666"]


def test_freeze_guard_refuses_a_base_without_torch(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "numpy", "1.26.4")
    proc = _run_guard(site, tmp_path / "keep.txt", isolated=True)
    assert proc.returncode == 1 and "torch is not installed" in proc.stderr


def test_dockerfile_uses_the_guard_script_not_pip_freeze_grep():
    runs = " ".join(args for word, args in dockerfile() if word == "RUN")
    assert "keep_gpu_stack.py" in runs and "pip freeze" not in runs


def _check_image(tmp_path: Path, torch_version: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    vfile = tmp_path / "torch-version"
    vfile.write_text(torch_version + "\n")
    env = {**os.environ, "REQUIRE_TE": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p)}
    return subprocess.run([sys.executable, str(DOCKER / "check_image.py"), str(vfile)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_self_check_imports_megatron_core_and_says_te_not_verified(tmp_path):
    ok = _check_image(tmp_path, torch.__version__)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "megatron-core 0.16" in ok.stdout and "transformer-engine: NOT VERIFIED (REQUIRE_TE=0" in ok.stdout
    moved = _check_image(tmp_path, "0.0.1")
    assert moved.returncode == 1 and "torch changed" in moved.stderr


def test_self_check_fails_when_megatron_core_is_broken(tmp_path):
    """A broken TE shows up as `import megatron.core` failing; the check must then fail the build."""
    shadow = tmp_path / "shadow" / "megatron" / "core"
    shadow.mkdir(parents=True)
    (shadow.parent / "__init__.py").write_text("")
    (shadow / "__init__.py").write_text("raise ImportError('transformer_engine is broken (planted)')\n")
    proc = _check_image(tmp_path, torch.__version__, pythonpath=str(tmp_path / "shadow"))
    assert proc.returncode != 0 and "planted" in proc.stderr


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_dependencies_have_one_pinned_source():
    sys.path.insert(0, str(ROOT))
    source = (ROOT / "setup.py").read_text()
    ns: dict = {}
    exec(source[source.index("INSTALL_REQUIRES"):source.index("setup(")], ns)  # the lists only
    wanted = _names(ns["INSTALL_REQUIRES"] + ns["EXTRAS"]["image"]) - {"torch", "numpy"}
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: not an exact pin: {line}"
            pins[name.lower()] = version
    assert wanted <= set(pins), f"setup.py names without a pin in constraints.txt: {sorted(wanted - set(pins))}"
    runs = " ".join(args for word, args in dockerfile() if word == "RUN")
    runs += (DOCKER / "pip_install.sh").read_text()
    for name in wanted:  # no second, hand-copied dependency list in the build
        assert not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", runs), f"{name} listed in the build"
    assert "-c constraints.txt" in runs


def test_runtime_env_and_code_path():
    envs = [args for word, args in dockerfile() if word == "ENV"]
    last = [re.search(r"PIP_CONSTRAINT=(\S*)", e) for e in envs]
    values = [m.group(1) for m in last if m]
    assert values and values[-1] not in ("", '""', "''"), "PIP_CONSTRAINT left empty in the runtime image"
    sbatch = (ROOT / "examples/slurm/train.sbatch").read_text()
    mount = re.search(r"CONTAINER_DIR=\$\{CONTAINER_DIR:-([^}]+)\}", sbatch).group(1)
    for word, args in dockerfile():
        if word in ("WORKDIR", "COPY"):
            dest = args.split()[-1] if word == "COPY" else args
            assert not (dest.startswith(mount) or dest.startswith("/workspace")), f"{word} {args} under the mount"
        if word == "RUN":
            assert " -e " not in args, "editable install: the mount would shadow the baked code"
    assert " -e " not in (DOCKER / "pip_install.sh").read_text()


def test_dockerignore_keeps_runs_and_checkpoints_out():
    lines = (ROOT / ".dockerignore").read_text().split()
    for entry in ("runs/", "checkpoints/", ".venv*", ".git"):
        assert entry in lines

"""android-harness/termux-install.sh, run against stub `pkg`, `python3` and `edgemoe` commands.

The stubs record every call. `python3 -m pip` is only recorded. Any other `python3` call runs
the real interpreter over a fake site directory, whose packages report fixed versions as if
`pkg` had installed them.

Invariants checked:
- pip is never asked to install or build numpy, onnxruntime, pydantic-core or tokenizers;
  every dependency install is binary-only and pins those four to the pkg versions.
- pkg installs the four (tokenizers after tur-repo), and edgemoe itself goes in with --no-deps.
- the smoke test runs `edgemoe generate` on the bundle when one exists.
- a pip step that replaces a pkg-provided package fails the script; so does running outside Termux.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "android-harness" / "termux-install.sh"
PKG_VERSIONS = {"numpy": "1.26.4", "onnxruntime": "1.22.0", "pydantic-core": "2.33.2",
                "tokenizers": "0.21.1"}
PKG_MODULES = {"numpy": "numpy", "onnxruntime": "onnxruntime", "pydantic-core": "pydantic_core",
               "tokenizers": "tokenizers"}
PURE_MODULES = ("fastapi", "uvicorn", "pydantic", "edgemoe")
PROTECTED = ("numpy", "onnxruntime", "pydantic-core", "pydantic_core", "tokenizers")


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def make_fake_site(site: Path) -> None:
    """Modules with a __version__ plus dist-info metadata for the pkg-provided packages."""
    for name, version in PKG_VERSIONS.items():
        module = PKG_MODULES[name]
        (site / module).mkdir(parents=True)
        (site / module / "__init__.py").write_text(f"__version__ = {version!r}\n")
        dist_info = site / f"{module}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for module in PURE_MODULES:
        (site / module).mkdir()
        (site / module / "__init__.py").write_text("__version__ = '0.0-stub'\n")


def make_stubs(bin_dir: Path, site: Path, log: Path, pip_replaces: str = "") -> None:
    """Stub commands that append one JSON line per call to `log`.

    With `pip_replaces` set to a pkg-provided name, the stub pip rewrites that package's
    version, as a pip that upgraded it would.
    """
    recorder = (f"import json, sys\n"
                f"with open({str(log)!r}, 'a') as f:\n"
                f"    f.write(json.dumps({{'cmd': sys.argv[1], 'args': sys.argv[2:]}}) + '\\n')\n")
    write_executable(bin_dir / "record.py", recorder)
    real_python = shlex.quote(sys.executable)
    record = f"{real_python} {shlex.quote(str(bin_dir / 'record.py'))}"
    write_executable(bin_dir / "pkg", f"#!/bin/sh\n{record} pkg \"$@\"\n")
    write_executable(bin_dir / "edgemoe", f"#!/bin/sh\n{record} edgemoe \"$@\"\necho 'Once upon a time'\n")
    write_executable(bin_dir / "sudo", f"#!/bin/sh\n{record} sudo \"$@\"\nexit 1\n")
    replace = ""
    if pip_replaces:
        module = PKG_MODULES[pip_replaces]
        old = site / f"{module}-{PKG_VERSIONS[pip_replaces]}.dist-info"
        replace = (f"  if [ -d {shlex.quote(str(old))} ]; then\n"
                   f"    sed -i 's/^Version: .*/Version: 99.0/' {shlex.quote(str(old / 'METADATA'))}\n"
                   f"  fi\n")
    write_executable(bin_dir / "python3", f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  shift 2
  {record} pip "$@"
  # Keep the constraints file's content, since the script deletes it on exit.
  prev=""
  for arg in "$@"; do
    if [ "$prev" = "-c" ]; then cp "$arg" {shlex.quote(str(log))}.constraints; fi
    prev="$arg"
  done
{replace}  exit 0
fi
PYTHONPATH={shlex.quote(str(site))} exec {real_python} "$@"
""")


def run_script(tmp_path: Path, *, bundle: bool = True, termux: bool = True,
               pip_replaces: str = "") -> tuple[subprocess.CompletedProcess, list[dict]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    site = tmp_path / "site"
    make_fake_site(site)
    log = tmp_path / "calls.jsonl"
    make_stubs(bin_dir, site, log, pip_replaces)
    home = tmp_path / "home"
    home.mkdir()
    if bundle:
        (home / "edgemoe-bundle").mkdir()
        (home / "edgemoe-bundle" / "manifest.json").write_text("{}")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp_path)}
    if termux:
        env["TERMUX_VERSION"] = "0.118.1"
    result = subprocess.run(["bash", str(SCRIPT), str(REPO_ROOT)], env=env, capture_output=True,
                            text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def requirement_names(args: list[str]) -> list[str]:
    """Positional requirement arguments of a `pip install` call, lowercased."""
    names = []
    skip_next = False
    for arg in args[1:]:
        if skip_next:
            skip_next = False
            continue
        if arg in ("-c", "-r", "--constraint", "--requirement", "--upgrade-strategy", "-t", "--target"):
            skip_next = True
            continue
        if not arg.startswith("-"):
            names.append(arg.lower())
    return names


def test_install_succeeds(tmp_path):
    result, _ = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "edgemoe generated text" in result.stdout


def test_pip_never_gets_compiled_packages(tmp_path):
    result, calls = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    pip_calls = [call["args"] for call in calls if call["cmd"] == "pip"]
    assert pip_calls, "pip was never called"
    for args in pip_calls:
        assert args[0] == "install", args
        for name in requirement_names(args):
            base = name.split("=")[0].split("<")[0].split(">")[0].replace("_", "-")
            assert base not in PROTECTED, f"pip was asked for {name}: {args}"


def test_dependency_installs_binary_and_pinned(tmp_path):
    result, calls = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    pip_calls = [call["args"] for call in calls if call["cmd"] == "pip"]
    dependency_calls = [args for args in pip_calls if "--no-deps" not in args]
    assert dependency_calls
    for args in dependency_calls:
        assert "--only-binary=:all:" in args, args
        assert "-c" in args, args
    constraints = (tmp_path / "calls.jsonl.constraints").read_text().split()
    for name, version in PKG_VERSIONS.items():
        assert f"{name}=={version}" in constraints


def test_edgemoe_installed_without_deps(tmp_path):
    result, calls = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    own = [call["args"] for call in calls if call["cmd"] == "pip" and str(REPO_ROOT) in call["args"]]
    assert len(own) == 1
    assert "--no-deps" in own[0]


def test_pkg_installs_compiled_packages(tmp_path):
    result, calls = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    requested = [arg for call in calls if call["cmd"] == "pkg" for arg in call["args"]]
    for package in ("python-numpy", "python-onnxruntime", "python-pydantic-core", "python-tokenizers"):
        assert package in requested
    assert requested.index("tur-repo") < requested.index("python-tokenizers")
    assert not [call for call in calls if call["cmd"] == "sudo"]


def test_smoke_test_runs_generate(tmp_path):
    result, calls = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    generate = [call["args"] for call in calls if call["cmd"] == "edgemoe"]
    assert len(generate) == 1
    assert generate[0][0] == "generate"
    assert generate[0][1] == str(tmp_path / "home" / "edgemoe-bundle")
    for name in ("onnxruntime", "numpy", "tokenizers", "pydantic_core"):
        assert f"{name} {PKG_VERSIONS[name.replace('_', '-')]}" in result.stdout


def test_missing_bundle_skips_generate(tmp_path):
    result, calls = run_script(tmp_path, bundle=False)
    assert result.returncode == 0, result.stderr
    assert not [call for call in calls if call["cmd"] == "edgemoe"]
    assert "push-bundle.sh" in result.stdout


@pytest.mark.parametrize("package", ["numpy", "pydantic-core"])
def test_replaced_package_fails(tmp_path, package):
    result, _ = run_script(tmp_path, pip_replaces=package)
    assert result.returncode == 1
    assert f"{package} changed from {PKG_VERSIONS[package]} to 99.0" in result.stderr


def test_outside_termux_fails(tmp_path):
    result, calls = run_script(tmp_path, termux=False)
    assert result.returncode == 1
    assert "Termux" in result.stderr
    assert not calls


def test_second_run_succeeds(tmp_path):
    first, _ = run_script(tmp_path)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(["bash", str(SCRIPT), str(REPO_ROOT)], capture_output=True, text=True,
                            timeout=60, env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
                                             "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path),
                                             "TERMUX_VERSION": "0.118.1"})
    assert second.returncode == 0, second.stderr


def test_pkg_failure_explains_next_step(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    site = tmp_path / "site"
    make_fake_site(site)
    log = tmp_path / "calls.jsonl"
    make_stubs(bin_dir, site, log)
    write_executable(bin_dir / "pkg", "#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "TERMUX_VERSION": "0.118.1"}

    result = subprocess.run(["bash", str(SCRIPT), str(REPO_ROOT)], env=env, capture_output=True,
                            text=True, timeout=60)

    assert result.returncode != 0
    assert "pkg update" in result.stderr + result.stdout

"""benchmarks/gpu_check.sh on a machine without a GPU: its arguments, its table, and an end-to-end run from
the prepared wheelhouse with the network cut, which must install offline, mark every GPU part "no CUDA
device", hang nowhere and attempt no download (a listening proxy records any attempt; a deliberate pip
download first shows that it would). The end-to-end run needs `bash benchmarks/gpu_check.sh --prepare`
to have been run here, and is skipped without it (CI's fresh clone has no wheelhouse).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
WHEELHOUSE = ROOT / "benchmarks" / "gpu" / "wheelhouse"
PARTS = ["setup", "conv", "kd_loss", "qad", "distill", "env", "parity", "engine", "estimate"]
BUDGET_S = 480  # the whole check on one H100, conv overlapping kd_loss + qad + distill


def gpu_check(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    environment.pop("OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=timeout, cwd=ROOT
    )


def timeouts(env: dict[str, str] | None = None) -> dict[str, int]:
    listed = gpu_check("--list", env=env)
    assert listed.returncode == 0, listed.stderr
    return {name: int(seconds) for name, seconds in re.findall(r"^(\w+)\s+(\d+) s$", listed.stdout, re.M)}


def table(out: Path) -> dict[str, tuple[str, int, str]]:
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    return {name: (status, int(seconds), result) for name, status, seconds, result in rows}


def test_list_shows_the_parts_in_order_within_the_budget():
    limits = timeouts()
    assert list(limits) == PARTS
    assert limits["conv"] == limits["kd_loss"] + limits["qad"] + limits["distill"]  # built while they run
    assert sum(seconds for name, seconds in limits.items() if name != "conv") <= BUDGET_S


def test_a_timeout_is_overridden_by_its_variable_and_conv_follows_the_parts_it_overlaps():
    limits = timeouts({"PARITY_TIMEOUT": "7", "QAD_TIMEOUT": "100"})
    assert limits["parity"] == 7 and limits["qad"] == 100
    assert limits["conv"] == limits["kd_loss"] + 100 + limits["distill"]


def test_help_describes_every_part():
    shown = gpu_check("--help")
    assert shown.returncode == 0
    for part in PARTS:
        assert re.search(rf"^  {part}\s", shown.stdout, re.M), part


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--bogus"], "unknown argument --bogus"),
        (["--only", "env,nope"], "no part named nope; the parts: " + " ".join(PARTS)),
        (["--skip", "gpu"], "no part named gpu"),
        (["--out"], "--out needs a value"),
        (["--only", ""], "--only needs a value"),
    ],
)
def test_bad_arguments_exit_2_and_say_why(args, said):
    refused = gpu_check(*args)
    assert refused.returncode == 2
    assert said in refused.stderr


def test_setup_without_a_wheelhouse_says_how_to_prepare_and_the_check_goes_on(tmp_path):
    done = gpu_check(
        "--skip", "conv,kd_loss,qad,distill,parity,engine,estimate", "--out", str(tmp_path / "out"),
        env={"WHEELHOUSE": str(tmp_path / "none"), "CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    rows = table(tmp_path / "out")
    assert list(rows) == ["setup", "env"]
    status, _, said = rows["setup"]
    assert status == "FAILED (1)" and "run bash benchmarks/gpu_check.sh --prepare" in said
    assert rows["env"][0] == "skipped"  # a failed part does not stop the next
    assert done.returncode == 1  # the count of parts that failed


def test_kd_loss_compares_the_chunked_loss_with_full_logits_on_cpu():
    script = ROOT / "benchmarks" / "gpu" / "kd_loss.py"
    sizes = ["--device", "cpu", "--tokens", "80", "--vocab", "260", "--hidden", "24", "--teacher-hidden", "40"]
    done = subprocess.run([sys.executable, str(script), *sizes, "--repeats", "1"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    row = r"^\| chunked \(compressor.losses\) \| [\d.]+ \| - \| [\d.]+ \| ([\d.e+-]+) \| ([\d.e+-]+) \|"
    chunked = re.search(row, done.stdout, re.M)
    assert chunked and float(chunked.group(1)) < 1e-3 and float(chunked.group(2)) < 2e-2  # loss, grad vs full
    assert "| Liger LigerFusedLinearJSD | needs CUDA |" in done.stdout
    assert done.stdout.splitlines()[-1].endswith("values and gradients agree")


# End to end, offline


def _why_not_offline() -> str | None:
    """Why the prepared end-to-end run cannot run here, or None."""
    if not WHEELHOUSE.is_dir():
        return f"no wheelhouse at {WHEELHOUSE}: run bash benchmarks/gpu_check.sh --prepare (needs network)"
    tags = set(sys_tags())
    wheels = [parse_wheel_filename(path.name) for path in WHEELHOUSE.glob("*.whl")]
    usable = {name for name, _, _, wheel_tags in wheels if wheel_tags & tags}
    lines = (ROOT / "benchmarks" / "gpu" / "wheels.txt").read_text().splitlines()
    wanted = {canonicalize_name(line.split("==")[0]) for line in lines if line.strip() and not line.startswith("#")}
    if wanted - usable:
        return f"the wheelhouse has no wheel for this Python of {', '.join(sorted(wanted - usable))}: prepare it here"
    return None


WHY_NOT_OFFLINE = _why_not_offline()
# A new network namespace (only a loopback, brought up inside) cuts the network; without one, the proxy
# still catches every attempt that honours the proxy variables, which pip, urllib and requests do.
CUT = (
    ["unshare", "-rn"]
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"]).returncode == 0
    else []
)
LISTENER = """
import socket, sys
server = socket.create_server(("127.0.0.1", 0))
open(sys.argv[1] + ".port", "w").write(str(server.getsockname()[1]))
while True:
    connection, _ = server.accept()
    with open(sys.argv[1], "ab") as log:  # opened per connection: the shell may move the file away
        log.write(connection.recv(300).split(b"\\r\\n")[0] + b"\\n")
    connection.close()
"""
RUN = """
if [ -n "$CUT" ]; then ip link set lo up; fi
"$PYTHON" "$LISTENER" "$ATTEMPTS" &
listener=$!
for _ in $(seq 100); do [ -s "$ATTEMPTS.port" ] && break; sleep 0.1; done
proxy="http://127.0.0.1:$(cat "$ATTEMPTS.port")"
export http_proxy=$proxy https_proxy=$proxy HTTP_PROXY=$proxy HTTPS_PROXY=$proxy ALL_PROXY=$proxy all_proxy=$proxy
unset no_proxy NO_PROXY
# the canary: a download the proxy must see
PIP_CONFIG_FILE=/dev/null "$PYTHON" -m pip download --no-deps --retries 0 --timeout 5 -d "$CANARY_DIR" six \
    >/dev/null 2>&1
mv "$ATTEMPTS" "$ATTEMPTS.canary"
bash benchmarks/gpu_check.sh --out "$OUT_DIR"
status=$?
kill "$listener"
exit "$status"
"""


@pytest.mark.skipif(WHY_NOT_OFFLINE is not None, reason=WHY_NOT_OFFLINE or "")
def test_prepared_check_runs_offline_to_its_table_with_every_gpu_part_skipped(tmp_path):
    (tmp_path / "listener.py").write_text(LISTENER)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CUT": " ".join(CUT),
        "LISTENER": str(tmp_path / "listener.py"),
        "ATTEMPTS": str(tmp_path / "attempts"),
        "CANARY_DIR": str(tmp_path / "canary"),
        "OUT_DIR": str(tmp_path / "out"),
        "CACHE": str(tmp_path / "cache"),
        "SETUP_TIMEOUT": "240",  # the budget is the GPU machine's; a shared 2-core machine is slower
    }
    env.pop("OUT", None)
    done = subprocess.run([*CUT, "bash", "-c", RUN], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    log = done.stdout + done.stderr

    assert "CONNECT" in (tmp_path / "attempts.canary").read_text()  # the proxy sees a download
    attempts = tmp_path / "attempts"
    assert not attempts.exists() or attempts.read_text() == "", f"download attempted: {attempts.read_text()}"
    assert done.returncode == 0, log
    rows = table(tmp_path / "out")
    assert list(rows) == PARTS
    status, seconds, said = rows["setup"]
    assert status == "ok", said
    assert said.startswith("13 packages installed offline; imports: nvidia-modelopt 0.47.0; datasets 5.2.0")
    for part in PARTS[1:]:
        assert rows[part] == ("skipped", 0, "no CUDA device"), part

    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("GPU check: no CUDA device;")
    assert "| parity | skipped | 0 | no CUDA device |" in summary
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as logs:
        assert "./setup.log" in logs.getnames()
    # the carried packages went into the cache's site: mamba-ssm without its CUDA extension's import
    site = tmp_path / "cache" / "site"
    assert (site / "mamba_ssm" / "ops" / "triton" / "ssd_combined.py").is_file()
    assert not re.search(r"^\s*(import|from) ", (site / "mamba_ssm" / "__init__.py").read_text(), re.M)


def _compress_commands_of_the_script() -> dict[str, list[str]]:
    """The `cli.py` commands the GPU parts of gpu_check.sh run, continuations joined and the shell's values
    put in (a path for a variable, 8 for an arithmetic expansion): part_distill's init and distill,
    part_estimate's arguments with a --gpu."""
    import shlex

    def words(shell: str) -> list[str]:
        return shlex.split(re.sub(r"\$\{?\w+\}?", "x", re.sub(r"\$\(\([^)]*\)\)", "8", shell)))

    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = {}
    for line in text.splitlines():
        if " cli.py " in line and "${args[@]}" not in line:
            args = words(line.split(" cli.py ", 1)[1].split("||")[0])
            commands[args[0]] = args
    (estimate,) = re.findall(r"local args=\((.*)\)", text)
    commands["estimate"] = ["estimate", *words(estimate), "--gpu", "h100-sxm"]
    return commands


def test_every_compress_command_of_the_gpu_parts_parses():
    # the GPU parts never run on a CPU machine: a flag renamed since they were written would fail only on
    # the first (scarce) GPU; every command they give compress is parsed here as the CLI parses it
    import importlib.util

    import typer

    spec = importlib.util.spec_from_file_location("qad", ROOT / "benchmarks" / "gpu" / "qad.py")
    qad = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qad)

    from cli import app

    group = typer.main.get_command(app)
    work, student = Path("/work"), Path("/work/distilled/model")
    commands = {
        **_compress_commands_of_the_script(),
        **{f"qad {name}": c for name, c in qad.student_commands(work, "sample-256.npy").items()},
        **{f"qad {name}": c for name, c in qad.run_commands(student, work, "sample-256.npy", "40k").items()},
        "qad eval": qad.eval_command([student, work / "ptq"], "valid-256.npy"),
    }
    assert {"init", "distill", "estimate", "qad prune", "qad qad", "qad eval"} <= commands.keys()
    for name, (subcommand, *args) in commands.items():
        command = group.commands[subcommand]
        try:
            command.make_context(subcommand, list(args))
        except Exception as error:  # a click usage error: an unknown option, a bad value
            pytest.fail(f"{name}: compress {subcommand} {' '.join(args)}: {error}")

"""Deployment invariants, proven on the committed files (no Docker engine needed).

docker-compose.yml is parsed with PyYAML and interpolated the way Compose does; the Dockerfiles with
the small parser below. Where a claim can be checked by running something real, it is: the pinned
set against the installed environment, the API's import closure against requirements/api.txt (a real
`fprotoseg serve` process answering the compose healthcheck), the compose environment against the
service's own Settings class, and bench/gpu.py on the CPU path.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
API_DOCKERFILE = REPO_ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = REPO_ROOT / "docker" / "worker.Dockerfile"
CONSTRAINTS = REPO_ROOT / "requirements" / "constraints.txt"
API_REQUIREMENTS = REPO_ROOT / "requirements" / "api.txt"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
SECRET_VARIABLES = ("FPROTOSEG_API_KEYS", "FPROTOSEG_CALLBACK_SECRET", "FLOWER_BASIC_AUTH")
# Packages that exist for the worker only; none may reach the API image.
WORKER_ONLY = (
    "torch", "triton", "openslide-python", "openslide-bin", "tiffslide", "tifffile", "imagecodecs",
    "opencv-python-headless", "numpy", "scipy", "shapely", "safetensors", "pillow",
)


# ---- a small Dockerfile parser ----------------------------------------------------------------------
@dataclass
class Stage:
    base: str  # image reference with global ARG defaults substituted, or a previous stage's alias
    alias: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)
    raw: str = ""  # the FROM reference as written (e.g. ${PYTHON_IMAGE})

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def declared(self) -> dict[str, str | None]:
        """The stage's ARGs: name -> default ("" for `ARG X=`, None for a bare `ARG X`)."""
        out: dict[str, str | None] = {}
        for rest in self.args("ARG"):
            key, sep, value = rest.partition("=")
            out[key.strip()] = value.strip().strip('"') if sep else None
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def all(self, keyword: str) -> list[str]:
        return [rest for s in self.stages for rest in s.args(keyword)]

    def arg_default(self, name: str) -> str | None:
        """Default of an ARG declared globally or in any stage."""
        if name in self.global_args:
            return self.global_args[name]
        for rest in self.all("ARG"):
            key, _, value = rest.partition("=")
            if key.strip() == name:
                return value.strip().strip('"') or None
        return None


def _substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions per stage; continuation lines joined, comments dropped, FROM ARGs resolved."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments (and parser directives) also may sit inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            key, _, value = rest.partition("=")
            global_args[key.strip()] = value.strip().strip('"')
        elif keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(_substitute(words[0], global_args), alias, raw=words[0]))
        else:
            assert stages, f"{path.name}: {keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(global_args, stages)


def exec_form(rest: str) -> list[str]:
    """The JSON exec form of CMD/HEALTHCHECK CMD as a list of strings."""
    import json

    rest = rest.split("CMD", 1)[1] if rest.lstrip().startswith("--") or rest.startswith("CMD") else rest
    return json.loads(rest.strip())


def pip_installs(dockerfile: Dockerfile) -> list[list[str]]:
    """Every `pip install ...` command line in RUN instructions, as argument lists."""
    found = []
    for run in dockerfile.all("RUN"):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                if command[:2] in (["pip", "install"], ["pip3", "install"]):
                    found.append(command[2:])
                command = []
            else:
                command.append(token)
    return found


def dockerignore_entries() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def assert_pinned_image(ref: str, where: str) -> None:
    """A registry image pinned to a version tag (never `latest`), optionally by digest too."""
    name, _, digest = ref.partition("@")
    _, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "")
    assert tag, f"{where}: image {ref!r} has no tag"
    assert tag != "latest" and "latest" not in tag, f"{where}: image {ref!r} uses latest"
    assert re.search(r"\d+\.\d+", tag), f"{where}: tag of {ref!r} names no version"
    if digest:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{where}: bad digest in {ref!r}"


# ---- compose helpers ----------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?"):
            assert current, f"compose requires {name}: {arg}"
            return current
        return current or ""

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|-|:\?|\?)([^}]*))?\}", one, value)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def service_environment(service: str, env: dict[str, str]) -> dict[str, str]:
    raw = compose()["services"][service].get("environment") or {}
    assert isinstance(raw, dict), "environment is a mapping (KEY: value) in docker-compose.yml"
    return {k: interpolate(str(v), env) for k, v in raw.items()}


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.!+\-]+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


# ---- docker-compose.yml ----------------------------------------------------------------------------------
def test_worker_reserves_exactly_one_nvidia_gpu() -> None:
    devices = compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_worker_runs_one_job_at_a_time_and_scales() -> None:
    worker = compose()["services"]["worker"]
    assert worker["command"][:2] == ["fprotoseg", "worker"]
    assert service_environment("worker", env_example())["FPROTOSEG_WORKER_CONCURRENCY"] == "1"
    # `docker compose up --scale worker=N` refuses a fixed container name or host port.
    assert "container_name" not in worker and "ports" not in worker
    assert "build" in worker and "image" in worker  # every replica runs the same built image


def test_api_runs_serve_publishes_a_port_and_checks_healthz() -> None:
    api = compose()["services"]["api"]
    assert api["command"] == ["fprotoseg", "serve", "--host", "0.0.0.0", "--port", "8000"]
    published = interpolate(api["ports"][0], env_example())
    assert published.endswith(":8000") and published.split(":")[1] == env_example()["FPROTOSEG_API_PORT"]
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD" and any("/healthz" in part and ":8000" in part for part in test)
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_persists_append_only_with_a_healthcheck() -> None:
    services = compose()
    redis = services["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"  # never drop queued jobs
    volumes = [v.split(":") for v in redis["volumes"]]
    assert any(target == "/data" and source in services["volumes"] for source, target in volumes)
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert "ports" not in redis  # reachable from the compose network only


def test_uploads_and_results_share_one_volume_at_the_data_dir() -> None:
    doc = compose()
    env = env_example()
    mounts = {}
    for name in ("api", "worker"):
        data_dir = service_environment(name, env)["FPROTOSEG_DATA_DIR"]
        volumes = [interpolate(v, env) for v in doc["services"][name]["volumes"]]
        [volume] = [v for v in volumes if v.endswith(f":{data_dir}")]
        mounts[name] = (volume.split(":")[0], data_dir)
    assert mounts["api"] == mounts["worker"]
    source = mounts["api"][0]
    assert source in doc["volumes"], "the default data volume is a declared named volume"
    # A host path (shared storage for workers on other hosts) replaces it in both services alike.
    shared = {**env, "FPROTOSEG_HOST_DATA_DIR": "/mnt/fprotoseg"}
    for name in ("api", "worker"):
        volumes = [interpolate(v, shared) for v in doc["services"][name]["volumes"]]
        assert f"/mnt/fprotoseg:{mounts[name][1]}" in volumes


def test_flower_is_an_optional_profile_bound_to_localhost() -> None:
    doc = compose()
    flower = doc["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    assert all("profiles" not in doc["services"][s] for s in ("redis", "api", "worker"))
    assert interpolate(flower["ports"][0], env_example()).startswith("127.0.0.1:")
    assert_pinned_image(flower["image"], "flower")
    # Flower reads the Celery config compose mounts, which carries the workers' Kombu key prefix.
    assert "--config celeryconfig" in flower["command"][-1]
    [mount] = flower["configs"]
    assert mount["target"] == f"{flower['environment']['PYTHONPATH']}/celeryconfig.py"
    config = flower_celeryconfig(mount["source"], "redis://redis:6379/0")
    from fprotoseg.worker.service.settings import Settings

    assert config["broker_transport_options"]["global_keyprefix"] == Settings.model_fields[
        "redis_key_prefix"
    ].default


def flower_celeryconfig(source: str, broker_url: str) -> dict:
    """Execute the inline Celery config compose gives Flower; its module variables."""
    content = compose()["configs"][source]["content"]
    namespace: dict = {}
    old = os.environ.get("FLOWER_BROKER_URL")
    os.environ["FLOWER_BROKER_URL"] = broker_url
    try:
        exec(compile(content, "celeryconfig.py", "exec"), namespace)
    finally:
        if old is None:
            del os.environ["FLOWER_BROKER_URL"]
        else:
            os.environ["FLOWER_BROKER_URL"] = old
    assert namespace["broker_url"] == broker_url
    return namespace


def test_compose_images_are_pinned_and_built_images_versioned() -> None:
    for name, service in compose()["services"].items():
        ref = interpolate(service["image"], env_example())
        if "build" in service:
            assert re.fullmatch(r"fprotoseg-(api|worker):\d+\.\d+\.\d+", ref), f"{name}: {ref}"
            assert (REPO_ROOT / service["build"]["dockerfile"]).is_file()
        else:
            assert_pinned_image(ref, f"docker-compose.yml {name}")


def test_every_compose_variable_is_documented_in_env_example_and_vice_versa() -> None:
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text().replace("$$", "")))
    documented = set(env_example())
    assert used - documented == set(), "document these in .env.example"
    assert documented - used == set(), ".env.example documents variables compose does not use"


def test_compose_environment_is_a_valid_service_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values compose hands the containers (from .env.example) pass the service's own Settings."""
    from fprotoseg.worker.service.settings import load_settings

    env = {**env_example(), "FPROTOSEG_API_KEYS": "k1,k2"}
    for service in ("api", "worker"):
        for key in [k for k in os.environ if k.startswith("FPROTOSEG_")]:
            monkeypatch.delenv(key)
        for key, value in service_environment(service, env).items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.data_dir == Path("/data")
        assert settings.broker_url == "redis://redis:6379/0"
        assert settings.api_keys == ["k1", "k2"] and settings.auth_disabled is False
        assert settings.checkpoint is None  # empty = the packaged model
        assert settings.callback_secret is None
        assert settings.worker_concurrency == 1


# ---- no secrets committed ---------------------------------------------------------------------------
def test_no_secret_is_committed() -> None:
    env = env_example()
    for name in SECRET_VARIABLES:
        assert env[name] == "", f".env.example must leave {name} empty"
    text = COMPOSE.read_text()
    for name in SECRET_VARIABLES:
        for value in re.findall(rf"^\s*{name}:\s*(.*)$", text, flags=re.M):
            assert re.fullmatch(rf"\$\{{{name}:-\}}", value.strip()), f"compose hard-codes {name}: {value}"
    for dockerfile in (API_DOCKERFILE, WORKER_DOCKERFILE):
        assert not any(s in dockerfile.read_text() for s in SECRET_VARIABLES), dockerfile.name
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO_ROOT, check=False)
    assert ignored.returncode == 0, ".env must be git-ignored"
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""
    assert ".env" in dockerignore_entries(), ".env must stay out of images"


# ---- Dockerfiles ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.stem)
def test_images_are_multi_stage_pinned_and_non_root(path: Path) -> None:
    df = parse_dockerfile(path)
    aliases: set[str] = set()
    for stage in df.stages:
        if stage.base not in aliases:
            assert "$" not in stage.base, f"{path.name}: unresolved base {stage.base}"
            assert_pinned_image(stage.base, path.name)
            assert "@sha256:" in stage.base, f"{path.name}: pin {stage.base} by digest too"
        if stage.alias:
            aliases.add(stage.alias)
    assert len(df.stages) >= 2
    assert any(rest.startswith("--from=") for rest in df.final.args("COPY")), "final stage copies a build"
    assert not df.final.args("RUN") or all("pip install" not in r for r in df.final.args("RUN"))
    users = df.final.args("USER")
    assert users, f"{path.name}: no USER in the final stage"
    user = _substitute(users[-1], {k: df.arg_default(k) or "" for k in ("APP_UID",)}).split(":")[0]
    assert user not in ("", "root", "0"), f"{path.name}: runs as {user!r}"
    last_user = max(i for i, (kw, _) in enumerate(df.final.instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in df.final.instructions[last_user:]), "RUN after USER runs as the user"
    data_dirs = [e for e in df.final.args("ENV") if "FPROTOSEG_DATA_DIR=/data" in e]
    assert data_dirs, f"{path.name}: FPROTOSEG_DATA_DIR=/data"


def test_api_image_installs_only_the_api_subset_and_no_torch() -> None:
    df = parse_dockerfile(API_DOCKERFILE)
    installs = pip_installs(df)
    assert ["-r", "requirements/api.txt", "-c", "requirements/constraints.txt"] in installs
    assert ["--no-deps", "."] in installs
    for args in installs:
        assert not any(canonicalize_name(re.split(r"[<>=\[]", a)[0]) == "torch" for a in args)
    assert df.final.base == df.stages[0].base and "nvidia" not in df.final.base
    [healthcheck] = df.final.args("HEALTHCHECK")
    assert "http://127.0.0.1:8000/healthz" in " ".join(exec_form(healthcheck))
    assert exec_form(df.final.args("CMD")[-1]) == compose()["services"]["api"]["command"]
    pins = read_pins(API_REQUIREMENTS)
    assert not set(map(canonicalize_name, WORKER_ONLY)) & set(pins), "worker-only package in api.txt"
    assert not any(n.startswith("nvidia-") for n in pins)


def test_worker_image_installs_torch_of_its_flavour_and_the_constraints() -> None:
    df = parse_dockerfile(WORKER_DOCKERFILE)
    # One pinned Python for both images: the worker's base is the API's (CPython 3.11.14, bookworm).
    api_base = parse_dockerfile(API_DOCKERFILE).stages[0].base
    assert df.final.base == df.stages[0].base == api_base
    torch_pin = read_pins(CONSTRAINTS)["torch"]
    assert df.arg_default("TORCH_VERSION") == torch_pin
    # The GPU flavour is the default; the CPU flavour asks for torch's +cpu build explicitly.
    assert df.global_args["WORKER_FLAVOUR"] == "gpu"
    [torch_run] = [r for r in df.all("RUN") if "pip install \"$torch\"" in r]
    assert 'gpu) torch="torch==${TORCH_VERSION}"' in torch_run
    assert 'cpu) torch="torch==${TORCH_VERSION}+cpu"' in torch_run
    assert "torch.version.cuda" in torch_run  # the build fails when torch is not of the flavour
    installs = pip_installs(df)
    torch_install = next(a for a in installs if "$torch" in a)
    # torch's own index is an extra index, only when TORCH_INDEX_URL is given; pip keeps its default one
    assert torch_install[-2:] == ["${TORCH_INDEX_URL:+--extra-index-url", "$TORCH_INDEX_URL}"]
    assert "--index-url" not in torch_install
    assert df.stages[0].declared()["TORCH_INDEX_URL"] == ""
    for args in installs:
        assert "-c" in args and args[args.index("-c") + 1] == "requirements/constraints.txt", args
    assert [".", "-c", "requirements/constraints.txt"] in installs
    # OpenSlide from the openslide-bin wheel: no system library.
    assert "openslide-bin" in read_pins(CONSTRAINTS)
    assert exec_form(df.final.args("CMD")[-1]) == ["fprotoseg", "worker"]


def test_compose_builds_the_gpu_flavour_by_default() -> None:
    worker = compose()["services"]["worker"]
    assert "WORKER_FLAVOUR" not in str(worker["build"].get("args", {}))  # the Dockerfile's default: gpu
    assert parse_dockerfile(WORKER_DOCKERFILE).global_args["WORKER_FLAVOUR"] == "gpu"
    assert service_environment("worker", env_example())["FPROTOSEG_DEVICE"] == "cuda"


# Commands that fetch something other than a package from the indexes the build arguments name.
DOWNLOADERS = re.compile(
    r"\b(curl|wget|apt-get|apt|aptitude|apk|dnf|yum|microdnf|zypper|conda|mamba|micromamba|git|svn|hg)\b"
    r"|\buv\s+(python|pip|sync|tool|run|venv)\b|\bpip3?\s+download\b|\bensurepip\s+--upgrade"
)
URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://")
# The package sources every stage that runs pip declares, each empty by default (pip's default index).
SOURCE_ARGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST", "CA_CERTS")
PIP_SOURCE_OPTIONS = (
    "-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--trusted-host", "--cert"
)


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.stem)
def test_every_from_and_every_download_goes_through_a_build_argument(path: Path) -> None:
    text = path.read_text()
    # A `# syntax=` directive makes BuildKit pull a frontend image that no build argument names.
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.M | re.I), f"{path.name}: syntax directive"
    df = parse_dockerfile(path)
    aliases: set[str] = set()
    for stage in df.stages:
        if stage.raw not in aliases:
            match = re.fullmatch(r"\$\{(\w+)\}", stage.raw)
            assert match, f"{path.name}: FROM {stage.raw} is not a build argument"
            default = df.global_args.get(match.group(1), "")
            assert_pinned_image(default, f"{path.name} {match.group(1)}")
            assert "@sha256:" in default, f"{path.name}: {match.group(1)} pinned by digest too"
        if stage.alias:
            aliases.add(stage.alias)
    for stage in df.stages:
        declared = stage.declared()
        for keyword, rest in stage.instructions:
            if keyword == "ADD":
                assert not URL.search(rest), f"{path.name}: ADD downloads: {rest}"
            if keyword == "COPY" and rest.startswith("--from="):
                source = rest.split()[0].removeprefix("--from=")
                assert source in aliases, f"{path.name}: COPY --from={source} pulls an image, not a stage"
            if keyword != "RUN":
                continue
            assert not DOWNLOADERS.search(rest), f"{path.name}: a download outside the indexes: {rest}"
            assert not URL.search(rest), f"{path.name}: a fixed address in a RUN: {rest}"
        runs_pip = [r for r in stage.args("RUN") if re.search(r"\bpip3?\s+install\b", r)]
        if runs_pip:
            for name in SOURCE_ARGS:
                assert declared.get(name) == "", f"{path.name} {stage.alias}: ARG {name}= (empty default)"
    for args in pip_installs(df):
        for i, arg in enumerate(args):
            option = arg.split("=", 1)[0].lstrip("${").split(":+")[-1]
            if option in PIP_SOURCE_OPTIONS:
                value = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
                assert re.fullmatch(r"\$\{?\w+\}?", value), f"{path.name}: {option} {value}"
                name = value.strip("${}")
                assert any(name in s.declared() for s in df.stages), f"{path.name}: {name} is no ARG"


def test_no_machine_specific_path_or_fixed_host_in_the_deployment_files() -> None:
    """Indexes, wheels and bases come in through build arguments and the environment, not the files."""
    smoke = REPO_ROOT / "docker" / "smoke.sh"
    for path in (API_DOCKERFILE, WORKER_DOCKERFILE, COMPOSE, smoke, REPO_ROOT / "Makefile"):
        for host in re.findall(r"\b[a-z][a-z0-9+.-]*://([^/:\s\"'$]+)", path.read_text()):
            assert host in ("127.0.0.1", "redis", "HOST"), f"{path.name} names the host {host}"
    # smoke.sh: host paths come from the repository's place or the environment; the absolute paths
    # it writes are the mount points it gives containers and the system's own.
    in_container = ("/data", "/tools", "/scratch", "/crops", "/usr/bin/env", "/dev/null", "/tmp", "/segment")
    code = "\n".join(re.sub(r"(^|\s)#\s.*$", "", line) for line in smoke.read_text().splitlines()[1:])
    for literal in re.findall(r"(?:^|[\s\"'=(:])(/[A-Za-z][\w./-]*)", code, flags=re.M):
        assert literal.startswith(in_container), f"smoke.sh names the path {literal}"


def test_smoke_test_is_a_make_target_outside_make_test() -> None:
    smoke = REPO_ROOT / "docker" / "smoke.sh"
    assert os.access(smoke, os.X_OK), "docker/smoke.sh is executable"
    subprocess.run(["bash", "-n", str(smoke)], check=True)
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipes = dict(re.findall(r"^([\w-]+):[^\n]*\n((?:\t[^\n]*\n)*)", makefile, flags=re.M))
    assert "docker/smoke.sh" in recipes["smoke"]
    assert "smoke" not in recipes["test"] and "smoke" not in recipes["test-fast"]
    text = smoke.read_text()
    # Base images from the environment (a site's registry), shared data found beside the repository.
    for name in ("FPROTOSEG_PYTHON_IMAGE", "FPROTOSEG_WORKER_BASE_IMAGE", "FPROTOSEG_REDIS_IMAGE"):
        assert f"${{{name}:-" in text
    assert "$REPO/../shared" in text
    assert "trap teardown EXIT" in text and "down --volumes --remove-orphans" in text
    assert "WORKER_FLAVOUR=cpu" in text and "--network" in text


def test_build_context_excludes_local_state_but_keeps_the_package() -> None:
    ignored = dockerignore_entries()
    for entry in (".git", ".venv", ".env", "tests"):
        assert entry in ignored
    for needed in ("app", "worker", "model", "requirements", "pyproject.toml", "bench"):
        assert needed not in ignored
    copied = " ".join(parse_dockerfile(WORKER_DOCKERFILE).all("COPY"))
    assert "model model" in copied  # the packaged default weights travel as package data


# ---- one pinned dependency set, the same in CI and in both images ------------------------------------
def test_constraints_pin_every_dependency_of_the_project() -> None:
    pins = read_pins(CONSTRAINTS)
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    missing = [r for r in declared if canonicalize_name(Requirement(r).name) not in pins]
    assert missing == [], "run `python requirements/freeze.py` after adding dependencies"
    for spec in declared:
        req = Requirement(spec)
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), spec
    assert "+" not in pins["torch"], "torch pinned without a local label (CPU in CI, CUDA in the image)"


def test_installed_environment_is_the_pinned_set() -> None:
    """CI installs with `-c requirements/constraints.txt`; what the tests run on is what ships."""
    pins = read_pins(CONSTRAINTS)
    wrong = {}
    for name, version in pins.items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            wrong[name] = (version, "not installed")
            continue
        if installed.split("+", 1)[0] != version:
            wrong[name] = (version, installed)
    assert wrong == {}, "environment differs from requirements/constraints.txt (pinned, installed)"


def test_ci_installs_with_the_constraints() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    lines = makefile.splitlines()
    installs = [line for line in lines if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("requirements/constraints.txt" in line for line in installs)
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()


def test_api_requirements_are_a_closed_subset_of_the_constraints() -> None:
    api = read_pins(API_REQUIREMENTS)
    pins = read_pins(CONSTRAINTS)
    assert {n: v for n, v in api.items() if pins.get(n) != v} == {}, "api.txt differs from constraints"
    env = default_environment()
    # Extras the API uses: uvicorn[standard] and celery[redis] (-> kombu[redis]).
    extras_used = {"uvicorn": ("standard",), "celery": ("redis",), "kombu": ("redis",)}
    missing = set()
    for name in api:
        extras = ("", *extras_used.get(name, ()))
        for spec in md.distribution(name).requires or []:
            dep = Requirement(spec)
            needed = dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras)
            if needed and canonicalize_name(dep.name) not in api:
                missing.add(f"{dep.name} (needed by {name})")
    assert missing == set()


# ---- the API really runs on requirements/api.txt alone --------------------------------------------------
BLOCKER = r"""
import importlib.abc, importlib.metadata as md, re, sys
def canon(n): return re.sub(r"[-_.]+", "-", n).lower()
allowed = {canon(l.split("==")[0]) for l in open(sys.argv[1]) if "==" in l} | {"pip", "setuptools"}
blocked = {top for top, dists in md.packages_distributions().items()
           if top != "fprotoseg" and not any(canon(d) in allowed for d in dists)}
class NotInApiImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in requirements/api.txt)", name=name)
        return None
sys.meta_path.insert(0, NotInApiImage())
from fprotoseg.app.cli import main
sys.argv = ["fprotoseg", *sys.argv[2:]]
sys.exit(main())
"""


def _api_only_cli(*args: str) -> list[str]:
    """`fprotoseg ARGS` in a process where every package outside requirements/api.txt is missing."""
    return [sys.executable, "-c", BLOCKER, str(API_REQUIREMENTS), *args]


def test_cli_imports_with_the_api_image_packages_only() -> None:
    done = subprocess.run(_api_only_cli("--help"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "COMMAND" in done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def _delete_redis_keys(prefix: str) -> None:
    """Leave the shared Redis as found: drop every key a test process created under its prefix."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


def test_api_serves_healthz_with_the_api_image_packages_only(tmp_path: Path) -> None:
    """`fprotoseg serve` with a broker, torch/OpenSlide/numpy absent, answers the compose healthcheck."""
    from fprotoseg.app.cli import build_parser

    if "serve" not in build_parser()._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        pytest.skip("fprotoseg serve is not built yet")
    if not _redis_up():
        pytest.skip("no Redis at 127.0.0.1:6379 (.ci/run starts one)")
    port = _free_port()
    prefix = f"fprotoseg-test-deploy-{uuid.uuid4().hex[:8]}:"
    env = {
        **os.environ,
        "FPROTOSEG_DATA_DIR": str(tmp_path / "data"),
        "FPROTOSEG_BROKER_URL": "redis://127.0.0.1:6379/0",
        "FPROTOSEG_REDIS_KEY_PREFIX": prefix,
        "FPROTOSEG_API_KEYS": "deploy-test-key",
    }
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        _api_only_cli("serve", "--host", "127.0.0.1", "--port", str(port)),
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        test = compose()["services"]["api"]["healthcheck"]["test"][1:]  # after "CMD"
        command = [sys.executable if w == "python" else w.replace(":8000/", f":{port}/") for w in test]
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"serve exited: {(tmp_path / 'serve.log').read_text()[-2000:]}"
            if subprocess.run(command, capture_output=True, timeout=10).returncode == 0:
                break
            assert time.monotonic() < deadline, f"no /healthz: {(tmp_path / 'serve.log').read_text()[-2000:]}"
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        _delete_redis_keys(prefix)


@pytest.mark.slow
def test_worker_healthcheck_answers_while_a_celery_worker_runs(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The compose worker healthcheck passes against a real `fprotoseg worker`, fails once it stops."""
    if not _redis_up():
        pytest.skip("no Redis at 127.0.0.1:6379 (.ci/run starts one)")
    tag = f"deploytest{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "FPROTOSEG_DATA_DIR": str(tmp_path / "data"),
        "FPROTOSEG_BROKER_URL": "redis://127.0.0.1:6379/0",
        "FPROTOSEG_QUEUE": tag,
        "FPROTOSEG_REDIS_KEY_PREFIX": f"{tag}:",
        "FPROTOSEG_CHECKPOINT": str(tiny_checkpoint),
        "FPROTOSEG_DEVICE": "cpu",
        "HOSTNAME": socket.gethostname(),  # Docker sets it in a container; Celery's %h is this name
    }
    test = compose()["services"]["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = test[1].replace("$$", "$").replace("celery ", f"{Path(sys.executable).parent}/celery ", 1)
    command = command.replace("--timeout 10", "--timeout 3")  # only to fail faster once it is down
    probe = ["sh", "-c", command]
    log = (tmp_path / "worker.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fprotoseg.app.cli", "worker"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while " ready." not in (tmp_path / "worker.log").read_text():
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.5)
        up = subprocess.run(probe, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stdout + up.stderr
        # Flower finds workers the same way (a broadcast under the workers' key prefix): the Celery
        # config compose mounts for Flower must reach this worker (its prefix swapped for the test's).
        source = compose()["services"]["flower"]["configs"][0]["source"]
        content = compose()["configs"][source]["content"].replace('"fprotoseg:"', f'"{tag}:"')
        assert f'"{tag}:"' in content
        (tmp_path / "flowercfg").mkdir()
        (tmp_path / "flowercfg" / "celeryconfig.py").write_text(content)
        flower_env = {
            **env, "PYTHONPATH": str(tmp_path / "flowercfg"), "FLOWER_BROKER_URL": env["FPROTOSEG_BROKER_URL"]
        }
        celery = str(Path(sys.executable).parent / "celery")
        ping = [celery, "--config", "celeryconfig", "inspect", "ping", "--timeout", "5"]
        seen = subprocess.run(ping, env=flower_env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert seen.returncode == 0 and "fprotoseg@" in seen.stdout, seen.stdout + seen.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    down = subprocess.run(probe, env=env, cwd=REPO_ROOT, capture_output=True, timeout=60)
    _delete_redis_keys(f"{tag}:")
    assert down.returncode != 0, "the healthcheck must fail when no worker answers"


# ---- bench/gpu.py on the CPU path ---------------------------------------------------------------------
def test_gpu_bench_runs_on_the_cpu_and_prints_its_tables(tiny_checkpoint: Path) -> None:
    from tests.conftest import shared_data_dir

    slide = shared_data_dir() / "slides" / "CMU-1-Small-Region.svs"
    args = ["--quick", "--device", "cpu", "--checkpoint", str(tiny_checkpoint)]
    args += ["--slide", str(slide)] if slide.exists() else ["--no-slide"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "measuring the CPU instead" in out
    rows = re.findall(r"^(fp32|bf16|fp16)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", out, flags=re.M)
    assert {r[0] for r in rows} == {"fp32", "bf16"}, out  # fp16 is GPU-only
    assert all(float(r[2]) > 0 for r in rows)
    if slide.exists():
        [e2e] = re.findall(r"^fp32\s+\d+\s+([\d.]+)\s+(\d+)\s+[\d.]+\s+open=", out, flags=re.M)
        assert float(e2e[0]) > 0 and int(e2e[1]) > 0, out  # seconds, tiles of one real slide


def test_gpu_bench_rejects_a_missing_checkpoint_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--quick", "--device", "cpu",
         "--no-slide", "--checkpoint", str(missing)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"bench/gpu.py: error: checkpoint not found: {missing}"

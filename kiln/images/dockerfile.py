"""Dockerfiles: parsed by dockerfile-parse (continuations, comments, quoting and variable
substitution), checked whole before anything runs, and turned into steps for a build.

Supported: FROM (one stage, a kiln image name), RUN (shell and exec form), COPY and ADD from the
context (no URLs, no archive extraction), ENV, ARG, WORKDIR, USER, LABEL, EXPOSE, CMD and
ENTRYPOINT. Anything else is refused with its instruction and line. Steps that change files (RUN,
COPY, ADD, WORKDIR) each get a cache key chained from the one before, so an unchanged Dockerfile
over an unchanged context rebuilds from the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import WordSplitter, extract_key_values

from .config import ImageConfig

FILE_STEPS = {"RUN", "COPY", "ADD", "WORKDIR"}
META_STEPS = {"ENV", "ARG", "USER", "LABEL", "EXPOSE", "CMD", "ENTRYPOINT"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".txz")
MAX_STEPS = 200


class DockerfileError(Exception):
    """A Dockerfile kiln cannot build; the message names the instruction and line."""


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]  # paths or globs in the context, relative to its root
    dest: str  # absolute path in the image
    chown: str = ""  # user[:group], "" = root


@dataclass
class State:
    """What the steps so far set: the image config and the build's variables."""

    config: ImageConfig = field(default_factory=ImageConfig)
    args: dict[str, str] = field(default_factory=dict)

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.config.env}

    def copy(self) -> State:
        c = self.config
        config = replace(c, env=dict(c.env), labels=dict(c.labels), exposed_ports=list(c.exposed_ports))
        return State(config, dict(self.args))


@dataclass
class Step:
    n: int  # 1-based, FROM is step 1
    line: int  # 1-based line in the Dockerfile
    instruction: str  # e.g. RUN
    text: str  # as written (continuations joined), for the log
    argv: list[str] = field(default_factory=list)  # RUN: what to run
    copy: Copy | None = None  # COPY/ADD
    workdir: str = ""  # WORKDIR: the directory to make
    state: State = field(default_factory=State)  # the state after this step

    @property
    def changes_files(self) -> bool:
        return self.instruction in FILE_STEPS


@dataclass
class Plan:
    base: str  # the FROM image's name
    steps: list[Step]  # FROM first

    @property
    def final(self) -> State:
        return self.steps[-1].state


def split_words(value: str, args: dict[str, str] | None = None, envs: dict[str, str] | None = None) -> list[str]:
    """Split like a shell (quotes kept together), with $VAR and ${VAR} replaced."""
    return [w for w in WordSplitter(value, args=args, envs=envs).split() if w is not None]


def _error(instruction: str, line: int, why: str) -> DockerfileError:
    return DockerfileError(f"line {line}: {instruction}: {why}")


def command_form(value: str, state: State) -> list[str]:
    """Exec form (a JSON array) as it is; shell form run by /bin/sh -c."""
    stripped = value.strip()
    if stripped.startswith("["):
        try:
            argv = json.loads(stripped)
        except ValueError:
            argv = None
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            return argv
    return ["/bin/sh", "-c", value]


def parse(text: str, base_config: Callable[[str], ImageConfig] = lambda name: ImageConfig()) -> Plan:
    """The build's plan; base_config gives the FROM image's config (its env, workdir, user and start
    command carry over, as in Docker) and may raise if there is no such image."""
    try:
        parser = DockerfileParser(fileobj=io.StringIO(text), env_replace=False)
        structure = parser.structure
    except Exception as e:  # the parser's own errors are not one class
        raise DockerfileError(f"cannot parse the Dockerfile: {e}") from None
    state = State()
    steps: list[Step] = []
    base = ""
    for item in structure:
        instruction, line, value = item["instruction"].upper(), item["startline"] + 1, item["value"]
        if instruction == "COMMENT":
            continue
        text = f"{instruction} {value}".strip()
        if not base:
            if instruction == "ARG":  # an ARG before FROM may name the base image
                for word in split_words(value, args=state.args):
                    key, _, default = word.partition("=")
                    state.args[key] = default
                continue
            if instruction != "FROM":
                raise _error(instruction, line, "the first instruction must be FROM")
        if instruction == "FROM":
            if base:
                raise _error(instruction, line, "multi-stage builds (a second FROM) are not supported")
            words = split_words(value, args=state.args)
            if not words or words[0].startswith("--") or (len(words) not in (1, 3)):
                raise _error(instruction, line, "must be FROM <kiln image name> [AS name]")
            base = words[0]
            state = State(base_config(base), state.args).copy()
            steps.append(Step(1, line, "FROM", text, state=state.copy()))
            continue
        state = state.copy()
        step = Step(len(steps) + 1, line, instruction, text)
        variables = state.variables()
        config = state.config
        if instruction == "RUN":
            step.argv = command_form(value, state)
        elif instruction in ("COPY", "ADD"):
            step.copy = parse_copy(instruction, line, value, state)
        elif instruction == "WORKDIR":
            words = split_words(value, args=state.args, envs=config.env)
            if len(words) != 1:
                raise _error(instruction, line, "takes one path")
            config.workdir = posixpath.normpath(posixpath.join(config.workdir or "/", words[0]))
            step.workdir = config.workdir
        elif instruction == "ENV":
            pairs = extract_key_values(True, state.args, config.env, value)
            if not pairs:
                raise _error(instruction, line, "needs KEY=value")
            config.env.update(pairs)
        elif instruction == "ARG":
            for word in split_words(value, args=state.args, envs=config.env):
                key, _, default = word.partition("=")
                if default or key not in state.args:
                    state.args[key] = default
        elif instruction == "USER":
            words = split_words(value, args=variables)
            if len(words) != 1:
                raise _error(instruction, line, "takes one user[:group]")
            config.user = words[0]
        elif instruction == "LABEL":
            config.labels.update(extract_key_values(True, state.args, config.env, value))
        elif instruction == "EXPOSE":
            for word in split_words(value, args=variables):
                port = word.split("/")[0]
                if not port.isdigit() or not 0 < int(port) < 65536:
                    raise _error(instruction, line, f"{word!r} is not a port")
                config.exposed_ports = sorted({*config.exposed_ports, int(port)})
        elif instruction == "CMD":
            config.cmd = command_form(value, state)
        elif instruction == "ENTRYPOINT":
            config.entrypoint = command_form(value, state)
            config.cmd = []  # as Docker does: an ENTRYPOINT resets the CMD set before it
        else:
            raise _error(instruction, line, "not supported by kiln's builds")
        step.state = state
        steps.append(step)
        if len(steps) > MAX_STEPS:
            raise DockerfileError(f"more than {MAX_STEPS} steps")
    if not base:
        raise DockerfileError("the Dockerfile has no FROM")
    return Plan(base, steps)


def parse_copy(instruction: str, line: int, value: str, state: State) -> Copy:
    words = split_words(value, args=state.args, envs=state.config.env)
    chown = ""
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag.startswith("--chown="):
            chown = flag.split("=", 1)[1]
        else:
            raise _error(instruction, line, f"{flag.split('=')[0]} is not supported")
    if value.strip().startswith("["):
        try:
            words = json.loads(value.strip())
        except ValueError:
            raise _error(instruction, line, "invalid JSON form") from None
    if len(words) < 2:
        raise _error(instruction, line, "needs a source and a destination")
    *sources, dest = words
    for s in sources:
        if "://" in s:
            raise _error(instruction, line, f"{s}: URLs are not supported (the build reaches nothing but its context)")
        if instruction == "ADD" and s.endswith(ARCHIVE_SUFFIXES):
            raise _error(instruction, line, f"{s}: ADD does not extract archives in kiln; COPY it and RUN tar")
        normal = posixpath.normpath(s.lstrip("/"))
        if normal == ".." or normal.startswith("../"):
            raise _error(instruction, line, f"{s} is outside the build context")
    target = posixpath.normpath(posixpath.join(state.config.workdir or "/", dest))
    if dest.endswith("/") or dest in (".", "./") or len(sources) > 1:  # a directory to copy into
        target = target.rstrip("/") + "/"
    srcs = tuple(posixpath.normpath(s.lstrip("/")) for s in sources)
    return Copy(srcs, target, chown)


def step_key(parent: str, step: Step, content_digest: str = "") -> str:
    """The cache key of a step's result: its parent's key, what it does, and (COPY) what it copies.
    RUN also depends on the env, user and workdir it runs with."""
    c = step.state.config
    blob = json.dumps(
        [parent, step.instruction, step.text, content_digest, c.env, c.user, c.workdir, step.state.args],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]

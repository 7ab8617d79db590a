"""Pure logic of images: recipes' keys, OCI configs, Dockerfile plans and cache keys, build
contexts, and preparing an untrusted tree's mount points without ever leaving it."""

import io
import os
import tarfile
from dataclasses import replace

import pytest

from kiln.images.config import ImageConfig
from kiln.images.context import BuildContext
from kiln.images.dockerfile import DockerfileError, parse, step_key
from kiln.images.recipes import DEFAULT, MINIMAL
from kiln.images.rootfs import ensure_mount_points


def test_a_recipe_key_changes_with_its_content_only():
    assert MINIMAL.key == replace(MINIMAL).key and MINIMAL.key != DEFAULT.key
    assert replace(MINIMAL, packages=(*MINIMAL.packages, "jq")).key != MINIMAL.key
    assert MINIMAL.dir_name == f"minimal-{MINIMAL.key}" and len(MINIMAL.key) == 12


def test_oci_config_fields_kiln_keeps():
    c = ImageConfig.from_oci(
        {
            "config": {
                "Env": ["PATH=/usr/bin", "EMPTY=", "A=b=c", "junk"],
                "WorkingDir": "/app",
                "User": "1000:1000",
                "Entrypoint": ["/entry"],
                "Cmd": ["serve", "--port", "80"],
                "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "x": {}},
                "Labels": {"org": "kiln"},
            }
        }
    )
    assert c.env == {"PATH": "/usr/bin", "EMPTY": "", "A": "b=c"}
    assert (c.workdir, c.user, c.start) == ("/app", "1000:1000", ["/entry", "serve", "--port", "80"])
    assert c.exposed_ports == [53, 80] and c.labels == {"org": "kiln"}
    assert ImageConfig.from_oci({}) == ImageConfig() and ImageConfig.from_json(c.to_json()) == c


def test_a_dockerfile_plan_carries_state_from_step_to_step():
    plan = parse(
        'ARG BASE=minimal\nFROM $BASE\nARG V=2\nENV A=1 B="two words"\nENV C 3\nWORKDIR app\nWORKDIR sub\n'
        'RUN echo $A\nUSER kiln\nCMD ["a", "b"]\nENTRYPOINT /run.sh\nLABEL x=y\nEXPOSE 80 443/tcp\n',
        lambda base: ImageConfig(env={"FROM_BASE": "1"}, cmd=["base-cmd"]),
    )
    assert plan.base == "minimal"
    final = plan.final.config
    assert final.env == {"FROM_BASE": "1", "A": "1", "B": "two words", "C": "3"}
    assert final.workdir == "/app/sub" and final.user == "kiln" and final.labels == {"x": "y"}
    assert final.entrypoint == ["/bin/sh", "-c", "/run.sh"] and final.cmd == []  # ENTRYPOINT resets CMD
    assert final.exposed_ports == [80, 443] and plan.final.args == {"BASE": "minimal", "V": "2"}
    run = next(s for s in plan.steps if s.instruction == "RUN")
    assert run.argv == ["/bin/sh", "-c", "echo $A"] and run.state.config.user == ""  # USER came later
    assert [s.n for s in plan.steps] == list(range(1, len(plan.steps) + 1))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "no FROM"),
        ('FROM minimal\nSHELL ["/bin/bash"]\n', "line 2: SHELL: not supported"),
        ("FROM minimal\nVOLUME /data\n", "line 2: VOLUME"),
        ("FROM minimal\nONBUILD RUN x\n", "ONBUILD"),
        ("FROM minimal\nEXPOSE http\n", "not a port"),
        ("FROM minimal\nCOPY onlyone\n", "source and a destination"),
        ("FROM minimal\nADD app.tar.gz /\n", "does not extract archives"),
        ("FROM --platform=x minimal\n", "FROM <kiln image name>"),
    ],
)
def test_dockerfiles_refused_with_their_line(text, needle):
    with pytest.raises(DockerfileError, match=needle):
        parse(text)


def test_step_keys_chain_and_change_with_what_a_step_depends_on():
    a = parse("FROM minimal\nENV X=1\nRUN make\n").steps[-1]
    b = parse("FROM minimal\nENV X=2\nRUN make\n").steps[-1]
    assert step_key("p", a) == step_key("p", a) != step_key("q", a)
    assert step_key("p", a) != step_key("p", b)  # RUN depends on its env
    assert step_key("p", a, "digest1") != step_key("p", a, "digest2")


def context(tmp_path, files: dict[str, bytes], extra=()) -> BuildContext:
    path = tmp_path / "ctx.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return BuildContext(path)


def test_copy_selects_files_directories_and_globs(tmp_path):
    ctx = context(tmp_path, {"a.txt": b"a", "b.txt": b"b", "src/x.py": b"x", "src/lib/y.py": b"y", "../evil": b"e"})
    plan = parse("FROM minimal\nWORKDIR /w\nCOPY a.txt ./\nCOPY src /opt/src\nCOPY *.txt /t/\nCOPY a.txt /f\n")
    dests = [[e.dest for e in ctx.select(s.copy)] for s in plan.steps if s.copy]
    assert dests == [["/w/a.txt"], ["/opt/src/lib/y.py", "/opt/src/x.py"], ["/t/a.txt", "/t/b.txt"], ["/f"]]
    assert "../evil" not in ctx.members and "evil" not in ctx.members  # never selectable
    copy = parse("FROM minimal\nCOPY nothing /x\n").steps[-1].copy
    assert copy is not None
    with pytest.raises(DockerfileError, match="nothing: no such file"):
        ctx.select(copy)
    one = parse("FROM minimal\nCOPY a.txt /f\n").steps[-1].copy
    assert one is not None
    assert ctx.digest(ctx.select(one)) != context(tmp_path, {"a.txt": b"changed"}).digest(ctx.select(one))


def test_mount_points_are_made_inside_a_hostile_tree(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "etc").symlink_to(outside)  # etc/resolv.conf would land outside
    (tree / "opt").symlink_to("../outside")
    (tree / "tmp").write_text("a file where a directory goes")
    os.symlink("/proc/self", tree / "proc")
    ensure_mount_points(tree)
    assert list(outside.iterdir()) == []
    assert (tree / "etc").is_dir() and not (tree / "etc").is_symlink()
    assert (tree / "etc/resolv.conf").is_file() and (tree / "opt/kiln/config.json").is_file()
    assert (tree / "tmp").is_dir() and (tree / "proc").is_dir() and not (tree / "proc").is_symlink()
    assert (tree / "workspace").stat().st_uid == 1000
    ensure_mount_points(tree)  # again: nothing changes, nothing fails

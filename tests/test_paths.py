"""The path rule itself (host/paths.py) on plain folders, and the behaviour without a ComfyUI host."""
from __future__ import annotations

import os

import pytest

from likeness.errors import InvalidInputError, PathNotAllowedError
from likeness.host import paths


@pytest.fixture
def tree(tmp_path):
    """input/ (with faces/, a link to outside/ and a link to a file outside), models/, outside/."""
    for sub in ("input/faces", "models/loras", "outside"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "outside" / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "outside", tmp_path / "input" / "link_out")
    os.symlink(tmp_path / "input" / "faces", tmp_path / "input" / "link_in")
    os.symlink(tmp_path / "outside" / "secret.png", tmp_path / "models" / "loras" / "linked.safetensors")
    return tmp_path


def test_is_inside_compares_whole_path_components(tmp_path):
    root = str(tmp_path / "input")
    assert paths.is_inside(root, root)
    assert paths.is_inside(os.path.join(root, "a", "b"), root)
    assert not paths.is_inside(root + "_other", root)  # a shared prefix is not containment
    assert not paths.is_inside(str(tmp_path), root)


def test_real_roots_resolve_dotdot_and_symlinks(tree):
    input_dir = str(tree / "input")
    assert paths.allowed_root(str(tree / "input" / "faces"), [input_dir]) == input_dir
    assert paths.allowed_root(str(tree / "input" / "link_in"), [input_dir]) == input_dir
    assert paths.allowed_root(str(tree / "input" / "faces" / ".." / ".." / "outside"), [input_dir]) is None
    assert paths.allowed_root(str(tree / "input" / "link_out"), [input_dir]) is None
    assert paths.allowed_root("/etc", [input_dir]) is None


def test_linked_roots_keep_the_operators_symlinks_but_not_dotdot(tree):
    models = str(tree / "models")
    linked = str(tree / "models" / "loras" / "linked.safetensors")
    assert paths.allowed_root(linked, [models]) is None  # its target is outside
    assert paths.allowed_root(linked, [models], [models]) == models
    assert paths.allowed_root(str(tree / "models" / ".." / "outside"), [models], [models]) is None


def test_refusal_names_input_resolved_path_allowed_folders_and_opt_in(tree):
    link = str(tree / "input" / "link_out")
    with pytest.raises(PathNotAllowedError) as caught:
        paths.check_allowed(link, [str(tree / "input")], what="training folder")
    message = str(caught.value)
    assert message.startswith(f"training folder: '{link}'")
    assert f"resolves to '{os.path.realpath(tree / 'outside')}'" in message
    assert str(tree / "input") in message
    assert paths.ALLOW_ANY_PATH_ENV + "=1" in message
    assert isinstance(caught.value, InvalidInputError)


def test_local_user_paths_sets_the_opt_in_and_restores_it(monkeypatch):
    monkeypatch.delenv(paths.ALLOW_ANY_PATH_ENV, raising=False)
    assert not paths.any_path_allowed()
    with paths.local_user_paths():
        assert paths.any_path_allowed()
    assert paths.ALLOW_ANY_PATH_ENV not in os.environ
    monkeypatch.setenv(paths.ALLOW_ANY_PATH_ENV, "0")
    with paths.local_user_paths():
        assert paths.any_path_allowed()
    assert os.environ[paths.ALLOW_ANY_PATH_ENV] == "0" and not paths.any_path_allowed()


@pytest.mark.parametrize("value, allowed", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False),
                                            ("no", False)])
def test_opt_in_values(monkeypatch, value, allowed):
    monkeypatch.setenv(paths.ALLOW_ANY_PATH_ENV, value)
    assert paths.any_path_allowed() is allowed


def test_without_a_host_paths_resolve_as_before(monkeypatch, tree):
    """Plain scripts and tests (no ComfyUI importable): absolute as given, relative to the working folder."""
    monkeypatch.setattr(paths, "comfy_available", lambda: False)
    monkeypatch.delenv(paths.ALLOW_ANY_PATH_ENV, raising=False)
    monkeypatch.chdir(tree)
    assert paths.resolve_user_path("/etc") == "/etc"
    assert paths.resolve_user_path(f"  {tree / 'outside'} ") == str(tree / "outside")
    assert paths.resolve_user_path("input/link_out") == str(tree / "input" / "link_out")
    assert paths.resolve_user_path("/etc/passwd", paths.MODEL) == "/etc/passwd"
    assert paths.resolve_user_path("~", paths.INPUT) == os.path.expanduser("~")


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="kind"):
        paths.resolve_user_path("x", "anything")


def test_the_message_lists_only_outermost_folders(tmp_path):
    roots = [str(tmp_path / "input"), str(tmp_path / "models"), str(tmp_path / "models" / "loras"),
             str(tmp_path / "extra"), str(tmp_path / "models")]
    assert paths.outermost(roots) == [str(tmp_path / "input"), str(tmp_path / "models"), str(tmp_path / "extra")]

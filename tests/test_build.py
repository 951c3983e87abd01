"""The Bazel BUILD files name every module and test, with correct deps.

BUILD files are Starlark; the subset used here (calls with literal arguments)
is evaluated with Python, each rule recorded as a target. Then:
  * every `lightning_jax/**.py` is in exactly one `py_library`,
  * every `tests/**/test_*.py` is in a test target, every `tools/*.py` in a
    `py_binary` (or a `py_library` of shared tool code),
  * every import of a project module is covered by the importing target itself
    or one of its direct deps, and every third-party import by `@pypi//<pkg>`,
  * every internal dep label names an existing target.
If `bazel` is on PATH, `bazel query //...` must also load.
"""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD_NAMES = ("BUILD", "BUILD.bazel")
# Import name -> PyPI hub package name.
THIRD_PARTY = {
  "absl": "absl_py",
  "chex": "chex",
  "hypothesis": "hypothesis",
  "jax": "jax",
  "matplotlib": "matplotlib",
  "numpy": "numpy",
  "optax": "optax",
  "pytest": "pytest",
  "scipy": "scipy",
  "tensorstore": "tensorstore",
  "tensorboardX": "tensorboardx",
}
TEST_RULES = ("py_test", "pytest_test")
# Deps that the `pytest_test` macro (tests/pytest.bzl) adds to every test.
PYTEST_DEPS = ("//tests:conftest", "@pypi//pytest", "@pypi//hypothesis")


def _label(package: str, label: str) -> str:
  """Canonical `//pkg:name` form of `label` written inside `package`."""
  if label.startswith("@"):
    return label
  if label.startswith(":"):
    return f"//{package}{label}"
  if label.startswith("//"):
    if ":" in label:
      return label
    return f"{label}:{label.rsplit('/', 1)[-1]}"
  return f"//{package}:{label}"


def _parse_build(path: pathlib.Path) -> list[dict]:
  package = path.parent.relative_to(ROOT).as_posix()
  package = "" if package == "." else package
  targets = []

  def rule(kind):
    def record(name, srcs=(), deps=(), main=None, **_):
      files = []
      for s in srcs:
        lbl = _label(package, s)
        pkg, file = lbl[2:].split(":")
        files.append(f"{pkg}/{file}" if pkg else file)
      deps = [_label(package, d) for d in deps]
      if kind == "pytest_test":
        deps += PYTEST_DEPS
      targets.append(
        dict(
          kind=kind,
          label=f"//{package}:{name}",
          srcs=files,
          deps=deps,
          main=main,
        )
      )

    return record

  def ignore(*args, **kwargs):
    del args, kwargs

  def no_glob(*args, **kwargs):
    raise AssertionError(f"{path}: list files explicitly, no glob().")

  env = dict(
    load=ignore,
    package=ignore,
    exports_files=ignore,
    filegroup=ignore,
    test_suite=ignore,
    glob=no_glob,
    **{k: rule(k) for k in ("py_library", "py_binary", *TEST_RULES)},
  )
  exec(compile(path.read_text(), str(path), "exec"), env)  # pylint: disable=exec-used
  return targets


def _all_targets() -> list[dict]:
  targets = []
  for name in BUILD_NAMES:
    for path in sorted(ROOT.rglob(name)):
      if ".git" in path.parts or any(
        p.startswith("bazel-") for p in path.parts
      ):
        continue
      targets.extend(_parse_build(path))
  return targets


def _imports(path: pathlib.Path) -> set[str]:
  mods = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      mods.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # `from pkg import mod` needs mod; `from mod import name` needs mod.
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        mods.add(sub if _module_file(sub) else node.module)
  return mods


def _module_file(module: str) -> str | None:
  """Repo-relative file defining `module`, if it is a project module."""
  base = ROOT / module.replace(".", "/")
  for candidate in (base.with_suffix(".py"), base / "__init__.py"):
    if candidate.is_file():
      return candidate.relative_to(ROOT).as_posix()
  return None


@pytest.fixture(scope="module")
def targets():
  return _all_targets()


def _owners(targets, kinds):
  owners = {}
  for t in targets:
    if t["kind"] in kinds:
      for f in t["srcs"]:
        owners.setdefault(f, []).append(t["label"])
  return owners


def test_every_library_module_in_exactly_one_py_library(targets):
  owners = _owners(targets, ("py_library",))
  modules = sorted(
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "lightning_jax").rglob("*.py")
  )
  assert modules, "no modules found"
  missing = [m for m in modules if m not in owners]
  twice = {m: owners[m] for m in modules if len(owners.get(m, [])) > 1}
  assert not missing, f"modules named by no py_library: {missing}"
  assert not twice, f"modules named by several py_library targets: {twice}"


def test_every_test_file_and_tool_has_a_target(targets):
  tests = _owners(targets, TEST_RULES)
  files = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
  )
  assert "tests/test_build.py" in files
  assert not [f for f in files if f not in tests], "tests without target"
  tool_targets = _owners(targets, ("py_binary", "py_library"))
  tools = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "tools").glob("*.py")
  )
  missing = [f for f in tools if f not in tool_targets]
  assert not missing, f"tools named by no py_binary/py_library: {missing}"


def test_deps_cover_imports_and_exist(targets):
  by_label = {t["label"]: t for t in targets}
  owner = {
    f: t["label"]
    for t in targets
    if t["kind"] == "py_library"
    for f in t["srcs"]
  }
  problems = []
  for t in targets:
    for dep in t["deps"]:
      if dep.startswith("//") and dep not in by_label:
        problems.append(f"{t['label']}: unknown dep {dep}")
    for src in t["srcs"]:
      if not (ROOT / src).is_file():
        problems.append(f"{t['label']}: missing source {src}")
        continue
      if not src.endswith(".py") or src == "tests/pytest_main.py":
        continue
      for mod in _imports(ROOT / src):
        top = mod.split(".")[0]
        if top in THIRD_PARTY:
          if f"@pypi//{THIRD_PARTY[top]}" not in t["deps"]:
            problems.append(
              f"{t['label']}: imports {top}, needs @pypi//{THIRD_PARTY[top]}"
            )
        else:
          # Project modules, and modules beside a script (its sys.path[0]).
          file = _module_file(mod) or _module_file(
            f"{pathlib.PurePosixPath(src).parent.as_posix().replace('/', '.')}"
            f".{mod}"
          )
          if file is None:
            continue
          if file in t["srcs"]:
            continue
          if owner.get(file) not in t["deps"]:
            problems.append(
              f"{t['label']}: imports {mod}, needs dep on "
              f"{owner.get(file, 'a py_library naming ' + file)}"
            )
  assert not problems, "\n".join(problems)


def test_parser_sees_a_missing_module(tmp_path, monkeypatch):
  """The checks above fail when a module is left out (guards the parser)."""
  (tmp_path / "lightning_jax").mkdir()
  (tmp_path / "lightning_jax" / "a.py").write_text("import numpy\n")
  (tmp_path / "lightning_jax" / "b.py").write_text("")
  (tmp_path / "lightning_jax" / "BUILD").write_text(
    'py_library(name = "x", srcs = ["a.py"], deps = [])\n'
  )
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  found = _all_targets()
  with pytest.raises(AssertionError, match="b.py"):
    test_every_library_module_in_exactly_one_py_library(found)
  with pytest.raises(AssertionError, match="@pypi//numpy"):
    test_deps_cover_imports_and_exist(found)


@pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel not on PATH")
def test_bazel_query_loads():
  result = subprocess.run(
    ["bazel", "query", "//..."],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-4000:]

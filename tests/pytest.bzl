"""`pytest_test`: a py_test that runs one pytest file through tests/pytest_main.py."""

load("@rules_python//python:defs.bzl", "py_test")

def pytest_test(name, srcs, deps = [], data = [], **kwargs):
    py_test(
        name = name,
        srcs = srcs + ["//tests:pytest_main.py"],
        main = "//tests:pytest_main.py",
        args = ["$(location %s)" % s for s in srcs],
        deps = deps + ["//tests:conftest", "@pypi//pytest", "@pypi//hypothesis"],
        data = data,
        **kwargs
    )

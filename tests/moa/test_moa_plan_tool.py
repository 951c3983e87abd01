"""tools/moa_plan.py: bad workdirs and list flags are one `error:` line."""

from tests import tool_testing


def test_bad_workdir_or_flag_is_one_error_line(tmp_path):
  (tmp_path / "file").write_text("")
  out = f"--out={tmp_path / 'plan.json'}"
  tool_testing.assert_one_error_line_each(
    "tools.moa_plan",
    [
      ([out, f"--workdir={tmp_path / 'none'}"], "does not exist"),
      ([out, f"--workdir={tmp_path / 'file'}"], "is not a directory"),
      ([out, f"--workdir={tmp_path}"], "no complete checkpoint"),
      ([out, "--lengths=64,x"], r"--lengths .* ints .*got 'x'"),
      ([out, "--lengths=64,,128"], r"--lengths .*got ''"),
      ([out, "--lengths=1"], r"--lengths .* ints in \[2, inf\]"),
      ([out, "--lengths="], "--lengths must not be empty"),
      ([out, "--alphas=8,nan"], r"--alphas .*floats .*got 'nan'"),
      ([out, "--betas=0.5,2"], r"--betas .*\[0.0, 1.0\], got '2'"),
      ([out, "--budget=1.5"], r"--budget must be in \(0, 1\]"),
      ([out, "--batch=0"], "--batch must be >= 1"),
      ([out, "--model=nope"], "nope"),
    ],
  )

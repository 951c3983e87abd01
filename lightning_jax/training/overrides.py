"""`field=value` overrides of frozen-dataclass configs, parsed by field type.

What `tools/train.py --override=d_model=256,pattern=deltanet,attention` does:
the text is split into fields, and each value is parsed by the field's
annotation (`int`, `float`, `bool`, `str`, `tuple[...]`, `X | None`, or a
class with a `load(path)` constructor, read from the file at the path: e.g.
`moa_plan=plan.json`).
"""

import dataclasses
import types
import typing


def parse_overrides(items) -> dict[str, str]:
  """`["a=1,b=x,y", "c=2"] -> {"a": "1", "b": "x,y", "c": "2"}`.

  A comma followed by text without `=`, or by a dotted `kind.name=value`
  entry, continues the previous value (lists; `mixer_options`):
  `["mixer_options=a.x=1,a.y=2"] -> {"mixer_options": "a.x=1,a.y=2"}`.

  Raises:
    ValueError: an item does not start with `field=`.
  """
  out, last = {}, None
  for item in items:
    for part in item.split(","):
      key, sep, value = part.partition("=")
      if sep and "." not in key:
        last = key.strip()
        if not last:
          raise ValueError(f"--override: empty field name in {item!r}.")
        out[last] = value.strip()
      elif last is None:
        raise ValueError(f"--override must be `field=value,...`, got {item!r}.")
      else:
        out[last] += "," + part.strip()
  return out


def parse_value(name: str, text: str, kind):
  """`text` parsed as the annotation `kind` of field `name`.

  Example:
    >>> parse_value("window", "none", int | None) is None
    True
    >>> parse_value("layerwise_ffn", "0.5,4", tuple[float, float] | None)
    (0.5, 4.0)
  """
  args = typing.get_args(kind)
  if typing.get_origin(kind) in (typing.Union, types.UnionType):
    if text.strip().lower() == "none" and type(None) in args:
      return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # `X | None`: X's own error says what is wrong
      return parse_value(name, text, options[0])
    for option in args:
      if option is not type(None):
        try:
          return parse_value(name, text, option)
        except ValueError:
          pass
    raise ValueError(f"--override {name}={text!r}: expected {kind}.")
  if typing.get_origin(kind) is tuple:
    items = [s.strip() for s in text.split(",") if s.strip()]
    kinds = (
      [args[0]] * len(items)
      if len(args) == 2 and args[1] is ...
      else (list(args))
    )
    if len(kinds) != len(items):
      raise ValueError(
        f"--override {name}={text!r}: expected {len(kinds)} "
        "comma-separated values."
      )
    return tuple(
      parse_value(name, s, k) for s, k in zip(items, kinds, strict=True)
    )
  if kind is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"--override {name}={text!r}: expected true/false.")
    return text.lower() in ("true", "1")
  if callable(getattr(kind, "load", None)):
    try:
      return kind.load(text)
    except (OSError, ValueError) as e:
      raise ValueError(
        f"--override {name}={text!r}: cannot load a {kind.__name__}: {e}"
      ) from None
  if kind in (int, float, str):
    try:
      return kind(text)
    except ValueError:
      raise ValueError(
        f"--override {name}={text!r}: expected {kind.__name__}."
      ) from None
  raise ValueError(f"--override {name}: cannot parse fields of type {kind}.")


def apply_overrides(config, overrides: dict[str, str]):
  """`config` (a frozen dataclass) with string `overrides` parsed and applied.

  Raises:
    ValueError: an unknown field (listing the fields) or an unparsable value.

  Example:
    >>> apply_overrides(models.ModelConfig(), {"d_model": "64"}).d_model
    64
  """
  fields = {f.name: f.type for f in dataclasses.fields(config)}
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(
      f"--override: unknown field(s) {unknown}; fields: {sorted(fields)}."
    )
  return dataclasses.replace(
    config, **{k: parse_value(k, v, fields[k]) for k, v in overrides.items()}
  )

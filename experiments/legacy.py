"""Bindings that moved into option groups, and the rewrite of a run's old ``config.gin``.

Run folders written before the option groups hold bindings such as
``build_model.mamba2_state_dim`` or ``make_iterator.source``. ``migrate`` rewrites such a
``config.gin`` to the current names (the same model, data and evaluation; it returns
``old -> new`` for each moved binding, for the log); ``check_moved`` stops any other gin file
or command-line binding that still uses an old name with an error saying where it moved.
``MOVED`` is the table.
"""
from __future__ import annotations

import ast
import re
from typing import Sequence

_MAMBA2 = ("head_dim", "state_dim", "expand", "num_groups", "conv_width", "chunk_size", "impl")
_SSM = ("decay_scale", "input_scale", "input_clip", "state_clip", "window")
_DATA = ("source", "packing", "max_files", "max_bytes", "glob", "val_every", "num_epochs")

MOVED: dict[str, str] = {
    "build_model.attention_spec": "build_model.attention_specs",
    "build_model.layer_cycle": "build_model.layer_pattern",
    **{f"build_model.mamba2_{n}": f"layers.Mamba2Config.{n}" for n in _MAMBA2},
    **{f"build_model.ssm_{n}": f"ssm.SSMOptions.{n}" for n in _SSM},
    **{f"make_iterator.{n}": f"data.DataConfig.{n}" for n in _DATA},
    **{f"evaluate.passkey_{n}": f"tasks.Passkey.{n}" for n in ("depths", "trials", "multipliers")},
}
# What binds a group, so that the moved bindings reach the code.
GROUPS: dict[str, tuple[str, ...]] = {
    "layers.Mamba2Config": ("build_model.mamba2 = @layers.Mamba2Config()",),
    "ssm.SSMOptions": ("build_model.mamba2 = @layers.Mamba2Config()",
                       "layers.Mamba2Config.options = @ssm.SSMOptions()"),
    "data.DataConfig": ("train.data = @data.DataConfig()", "evaluate.data = @data.DataConfig()"),
    "tasks.Passkey": ("evaluate.passkey = @tasks.Passkey()",),
}
_STATEMENT = re.compile(r"^(?:(?P<scope>[\w.]+)/)?(?P<key>[A-Za-z_][\w.]*)\s*=\s*(?P<value>.*)",
                        re.S)
_START = re.compile(r"^([A-Za-z_][\w./]*\s*=|include\b|import\b|#|\s*$)")


def _group(new_key: str) -> str:
    return new_key.rsplit(".", 1)[0]


def _moved_message(old: str) -> str:
    new = MOVED[old]
    extra = GROUPS.get(_group(new), ())
    where = f"`{new}`" + (f" (with {' and '.join(f'`{b}`' for b in extra)})" if extra else "")
    if old == "build_model.layer_cycle":
        where += "; layer_pattern now repeats up to num_layers"
    return f"`{old}` moved to {where}"


def _statements(text: str) -> list[str]:
    """Top-level statements of gin text; continuation lines stay with their statement."""
    out: list[str] = []
    for line in text.splitlines():
        if out and not _START.match(line):
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def _bound_keys(text: str):
    for stmt in _statements(text):
        m = _STATEMENT.match(stmt)
        if m and not stmt.startswith(("#", "include", "import")):
            yield m.group("key")


def check_moved(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every old binding in ``gin_files`` or ``bindings``."""
    found = []
    for source, text in [(f, open(f).read()) for f in gin_files] + [
            ("command line", b) for b in bindings]:
        found += [f"{source}: {_moved_message(k)}" for k in _bound_keys(text) if k in MOVED]
    if found:
        raise ValueError("gin bindings that moved into option groups:\n  " + "\n  ".join(found))


def migrate(text: str) -> tuple[str, list[str]]:
    """``(text with moved bindings rewritten, ["old -> new", ...])``.

    A text with no old names is returned unchanged. Otherwise, besides the renames, the old
    pairs ``attention_spec``/``attention_specs`` and ``layer_cycle``/``layer_pattern``
    collapse into one binding each: the plural / the cycle when not None, as the old
    ``build_model`` read them; an old explicit ``layer_pattern`` also fixes ``num_layers`` to its
    length (it used to be the whole model, whatever ``num_layers`` said).
    """
    if not any(k in MOVED for k in _bound_keys(text)):
        return text, []
    out, moved, groups, pairs = [], [], set(), {}
    pair_keys = ("build_model.attention_spec", "build_model.attention_specs",
                 "build_model.layer_cycle", "build_model.layer_pattern")
    for stmt in _statements(text):
        m = _STATEMENT.match(stmt)
        key = m.group("key") if m and not stmt.startswith(("#", "include", "import")) else None
        scope = f"{m.group('scope')}/" if key and m.group("scope") else ""
        if key in pair_keys:
            pairs[(scope, key)] = m.group("value").strip()
        elif key in MOVED:
            out.append(f"{scope}{MOVED[key]} = {m.group('value')}")
            moved.append(f"{key} -> {MOVED[key]}")
            groups.add((scope, _group(MOVED[key])))
        else:
            out.append(stmt)
    for scope in sorted({s for s, _ in pairs}):
        get = lambda k: pairs.get((scope, f"build_model.{k}"), "None")  # noqa: E731
        specs = get("attention_specs") if get("attention_specs") != "None" \
            else get("attention_spec")
        if specs != "None":
            out.append(f"{scope}build_model.attention_specs = {specs}")
        if get("layer_cycle") != "None":
            out.append(f"{scope}build_model.layer_pattern = {get('layer_cycle')}")
        elif get("layer_pattern") != "None":
            out.append(f"{scope}build_model.layer_pattern = {get('layer_pattern')}")
            length = len(ast.literal_eval(get("layer_pattern")))
            out.append(f"{scope}build_model.num_layers = {length}")
    out += dict.fromkeys(f"{scope}{binding}" for scope, group in sorted(groups)
                         for binding in GROUPS[group])
    return "\n".join(out) + "\n", moved

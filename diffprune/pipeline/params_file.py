"""``params.yaml``, written from the params models: the code defaults are the one source of defaults.

``python -m diffprune.pipeline.params_file`` writes the shipped file with every key and, as comments, each
group's and field's description; ``--check`` fails when the file differs (a test runs the check).
``--preset presets/latent-digits.yaml`` writes the whole file for a preset instead (keys it leaves out
take the defaults), so that ``dvc repro`` / ``dvc exp run`` run that preset.
"""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from diffprune.pipeline.config import Params, load_params
from diffprune.pipeline.generated import generator_main

HEADER = """\
# diffprune parameters: one group per stage, plus register, tracking, schedule, orchestration, sweep.
# Every stage reads only its own group; `diffprune <stage> --set key=value` overrides a key of it.
# Generated from diffprune/pipeline/stage_params.py and config.py by `python -m diffprune.pipeline.params_file`:
# change defaults there (a test checks that the two agree). For your own runs edit values here, pass --set,
# or use --params FILE.
"""
COMMENT_COLUMN = 27
WIDTH = 120  # a comment that would run past this goes on the line above its key


def _scalar(value) -> str:
    """One value in YAML flow style, read back as written by the loader (YAML 1.2 booleans)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("\n...").strip()


def _line(indent: int, key: str, value: str, comment: str | None) -> str:
    text = f"{'  ' * indent}{key}:" + (f" {value}" if value else "")
    if not comment:
        return text
    inline = f"{text.ljust(COMMENT_COLUMN - 1)} # {comment}" if len(text) < COMMENT_COLUMN - 1 else \
        f"{text}  # {comment}"
    return inline if len(inline) <= WIDTH else f"{'  ' * indent}# {comment}\n{text}"


def _group(model: BaseModel, indent: int) -> list[str]:
    lines = []
    values = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(_line(indent, name, "", field.description))
            lines += _group(value, indent + 1)
        else:
            lines.append(_line(indent, name, _scalar(values[name]), field.description))
    return lines


def _doc(model: type[BaseModel]) -> str:
    return (model.__doc__ or "").strip().splitlines()[0].rstrip(".")


def render(params: Params | None = None) -> str:
    """The whole params file for ``params`` (default: the code defaults)."""
    params = params or Params()
    lines = [HEADER]
    for name, field in Params.model_fields.items():
        group = getattr(params, name)
        lines.append(_line(0, field.alias or name, "", _doc(type(group))))
        lines += _group(group, 1)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def configure(parser) -> None:
        parser.add_argument("--preset", help="a params file of your own or a preset: render it in full instead")

    def render_args(args) -> str:
        return render(load_params(args.preset) if args.preset else None)

    source = "the defaults in diffprune/pipeline/stage_params.py and config.py"
    return generator_main("diffprune.pipeline.params_file", __doc__, "params.yaml", source, render_args, argv,
                          configure)


if __name__ == "__main__":
    raise SystemExit(main())

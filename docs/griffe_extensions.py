"""Griffe extensions for the API reference (``mkdocs.yml``): equinox modules, Sphinx markup.

``EquinoxModules``: ``equinox.Module`` turns every subclass into a dataclass through its
metaclass, which static analysis cannot see, so griffe gives such a class no ``__init__`` and
reports the documented fields as parameters missing from the signature. This extension writes
the ``__init__`` that equinox generates: the annotated fields of the class and its parents, in
definition order, with the ``default`` of ``eqx.field(...)`` where one is given.

``SphinxMarkup``: the docstrings are numpydoc with Sphinx roles (``:func:``, ``:math:``) and
``.. math::`` / ``::`` blocks, which Markdown shows verbatim; they are rewritten as Markdown
code spans and indented code blocks before the docstrings are parsed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

MODULE = "equinox.Module"
FIELD = "equinox.field"
NOT_FIELDS = ("equinox.AbstractVar", "equinox.AbstractClassVar", "typing.ClassVar")


def _mro(cls: griffe.Class) -> list[griffe.Class]:
    """The parents griffe can resolve (equinox itself is not loaded)."""
    try:
        return cls.mro()
    except ValueError:
        return []


def _is_equinox_module(cls: griffe.Class) -> bool:
    return any(
        isinstance(base, griffe.Expr) and base.canonical_path == MODULE
        for c in [cls, *_mro(cls)]
        for base in c.bases
    )


def _field_default(attribute: griffe.Attribute) -> tuple[bool, Any]:
    """(is a constructor parameter, its default or None)."""
    value = attribute.value
    if isinstance(value, griffe.ExprCall) and value.canonical_path == FIELD:
        args = {a.name: a.value for a in value.arguments if isinstance(a, griffe.ExprKeyword)}
        if str(args.get("init", "True")) == "False":
            return False, None
        if "default_factory" in args:
            return True, griffe.ExprCall(function=args["default_factory"], arguments=[])
        return True, args.get("default")
    return True, value


def _parameters(cls: griffe.Class) -> list[griffe.Parameter]:
    out: dict[str, griffe.Parameter] = {}
    for owner in [*reversed(_mro(cls)), cls]:
        for member in owner.members.values():
            if member.is_alias or not member.is_attribute or member.annotation is None:
                continue
            if "property" in member.labels or "instance-attribute" not in member.labels:
                continue  # a property, or a ClassVar
            annotation = member.annotation
            if isinstance(annotation, griffe.Expr) and any(
                annotation.canonical_path.startswith(p) for p in NOT_FIELDS
            ):
                continue
            is_init, default = _field_default(member)
            if is_init:
                out[member.name] = griffe.Parameter(
                    member.name,
                    annotation=annotation,
                    kind=griffe.ParameterKind.positional_or_keyword,
                    default=default,
                    docstring=member.docstring,
                )
    return list(out.values())


def _visit(obj: griffe.Module | griffe.Class, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, griffe.Class) and _is_equinox_module(obj):
        # As equinox does: a hand-written __init__, here or inherited, is kept.
        has_init = any(
            "__init__" in c.members and "dataclass" not in c.labels for c in [obj, *_mro(obj)]
        )
        if not has_init:
            init = griffe.Function(
                "__init__",
                lineno=0,
                endlineno=0,
                parent=obj,
                parameters=griffe.Parameters(
                    griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword),
                    *_parameters(obj),
                ),
                returns="None",
            )
            obj.set_member("__init__", init)
            obj.labels.add("dataclass")
    for member in list(obj.members.values()):
        if not member.is_alias and (member.is_module or member.is_class):
            _visit(member, seen)


class EquinoxModules(griffe.Extension):
    """Give every ``equinox.Module`` subclass its generated dataclass ``__init__``."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _visit(pkg, set())


#: ``:func:`~emdppl.driver.run``` -> ```run```; ``:math:`\sigma``` -> ```\sigma```.
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const|math):`(~?)([^`]+)`")
DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _role(match: re.Match) -> str:
    text = match.group(2)
    if match.group(1):
        text = text.rpartition(".")[2]
    return f"`{text}`"


def markdown(text: str) -> str:
    """A numpydoc docstring with Sphinx markup as Markdown (roles, math and literal blocks)."""
    lines = []
    for line in ROLE.sub(_role, text).splitlines():
        directive = DIRECTIVE.match(line)
        if directive:
            indent, first = directive.groups()
            lines += ["", f"{indent}    {first}"]
        elif line.endswith("::") and not line.lstrip().startswith(">>>"):
            lines += [line[:-1], ""]
        else:
            lines.append(line)
    return "\n".join(lines)


def _visit_docstrings(obj: griffe.Object, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if obj.docstring is not None:
        obj.docstring.value = markdown(obj.docstring.value)
    for member in list(obj.members.values()):
        if not member.is_alias:
            _visit_docstrings(member, seen)


class SphinxMarkup(griffe.Extension):
    """Rewrite Sphinx roles and directives in every docstring as Markdown."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _visit_docstrings(pkg, set())

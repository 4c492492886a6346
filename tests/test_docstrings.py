"""Docstrings of the public API (CPU): every name in fi_cupy.__all__, and every public method and
property of the public classes, has a docstring in FlashInfer's numpydoc layout as help() shows it:
a summary line; for a callable with parameters, a `Parameters` section naming each parameter of its
real signature (self, *args and **kwargs aside) and no other, each entry `name : type` with an
indented description, a parameter with a default saying `default ...` or `optional` (a stated literal
default must be the real one; `name : None` says that only the default None is accepted); a `Returns`
section for a callable that returns something.

PENDING lists modules whose docstrings are still being written: their names are skipped with the
reason "being documented". Empty it as they are done.
"""
import ast
import inspect
import re
import textwrap

import pytest

import fi_cupy

PENDING: set = set()

DATA_NAMES = {"__version__"}  # public names that are data, not callables or classes: nothing to document


# ---------------------------------------------------------------------------------------------
# What is public


def _own_module(cls, attr: str):
    """The module of the class in cls's MRO that defines attr (None when none does)."""
    for base in cls.__mro__:
        if attr in vars(base):
            return base.__module__
    return None


def _entries():
    """(id, module that owns it, kind, the object help() shows, signature source or None)."""
    for name in fi_cupy.__all__:
        if name in DATA_NAMES:
            continue
        obj = getattr(fi_cupy, name)
        if inspect.isclass(obj):
            yield f"fi_cupy.{name}", obj.__module__, "class", obj, obj
            for attr in sorted(dir(obj)):
                if attr.startswith("_") or not (_own_module(obj, attr) or "").startswith("fi_cupy"):
                    continue  # private, or inherited from a builtin base (an exception's with_traceback)
                raw = inspect.getattr_static(obj, attr)
                if isinstance(raw, property):
                    yield f"fi_cupy.{name}.{attr}", obj.__module__, "property", raw, None
                elif callable(getattr(obj, attr)):
                    kind = "staticmethod" if isinstance(raw, staticmethod) else "method"
                    yield f"fi_cupy.{name}.{attr}", obj.__module__, kind, getattr(obj, attr), getattr(obj, attr)
                # other class attributes are data (e.g. a family name): not documented one by one
        else:
            yield f"fi_cupy.{name}", obj.__module__, "function", obj, obj


ENTRIES = list(_entries())


# ---------------------------------------------------------------------------------------------
# numpydoc, as far as these checks need it


def _sections(doc: str) -> dict:
    """{section title: its lines} of a cleaned docstring: a title is a line over a line of dashes."""
    lines = doc.splitlines()
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and not lines[i][0].isspace() and re.fullmatch(r"-{3,}", lines[i + 1].strip())]
    out = {}
    for k, i in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        out[lines[i].strip()] = lines[i + 2:end]
    return out


_ENTRY = re.compile(r"(?P<names>\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?::\s*(?P<type>.*))?$")


def _param_entries(lines: list) -> tuple:
    """({name: (type text, description)}, [malformed lines]) of a Parameters section: an entry is a
    line at the section's indent, `name : type` (numpydoc; FlashInfer's `name: type` too), with its
    description indented below it. `a, b : type` documents both."""
    entries, bad, current = {}, [], None
    for line in lines:
        if not line.strip():
            continue
        if not line[0].isspace():
            m = _ENTRY.match(line.strip())
            if m is None:
                bad.append(line.strip())
                current = None
                continue
            current = [n.strip().lstrip("*") for n in m.group("names").split(",")]
            for n in current:
                entries[n] = [(m.group("type") or "").strip(), ""]
        elif current is not None:
            for n in current:
                entries[n][1] += line.strip() + " "
    return {n: (t, d.strip()) for n, (t, d) in entries.items()}, bad


def _stated_default(type_text: str):
    """The literal after `default` in an entry's type text, or a marker when there is none or it is
    not a Python literal (prose such as `default: q's dtype`)."""
    m = re.search(r"\bdefault\s*[:=]?\s*(.+)$", type_text)
    if m is None:
        return inspect.Parameter.empty
    text = m.group(1).strip().strip("`")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return inspect.Parameter.empty


def _returns_something(fn) -> bool:
    """Whether a function can return a value: not annotated `-> None`, and a `return <value>` in its
    own body (nested functions aside). Unreadable source counts as returning."""
    fn = inspect.unwrap(fn)
    if fn.__annotations__.get("return", inspect.Parameter.empty) in (None, "None"):
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return True
    func = tree.body[0]
    todo = list(func.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            return True
        todo.extend(ast.iter_child_nodes(node))
    return False


def _parameters(kind: str, sig_source) -> list:
    """The inspect.Parameter list a docstring must document (self, *args, **kwargs aside)."""
    if sig_source is None:
        return []
    try:
        params = list(inspect.signature(sig_source).parameters.values())
    except (ValueError, TypeError):  # a builtin constructor (exceptions): nothing of ours to document
        return []
    if kind == "method" and params:
        params = params[1:]  # self (as the class attribute, a method is the plain function)
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def problems(kind: str, obj, sig_source) -> list:
    """What is missing or wrong in the docstring help() shows for obj, as readable lines."""
    doc = inspect.getdoc(obj)
    if not doc or not doc.strip():
        return ["no docstring"]
    lines = doc.splitlines()
    out = []
    if not lines[0].strip():
        out.append("no summary line (the docstring's first line is empty)")
    params = _parameters(kind, sig_source)
    sections = _sections(doc)
    if kind == "class":  # the constructor's parameters: in the class docstring or in __init__'s
        if (_own_module(obj, "__init__") or "").startswith("fi_cupy"):
            init = _sections(inspect.getdoc(obj.__init__) or "")
            if "Parameters" in init:
                sections["Parameters"] = sections.get("Parameters", []) + init["Parameters"]
    if params or (kind not in ("class", "property") and _returns_something(sig_source)):
        if len(lines) > 1 and lines[1].strip():
            out.append("the summary must be one line followed by a blank line (numpydoc)")
    if params:
        if "Parameters" not in sections:
            out.append("no 'Parameters' section (a 'Parameters' line over '----------'); it must name: "
                       + ", ".join(p.name for p in params))
        else:
            entries, bad = _param_entries(sections["Parameters"])
            names = [p.name for p in params]
            missing = [n for n in names if n not in entries]
            extra = [n for n in entries if n not in names]
            if missing:
                out.append(f"Parameters lacks: {', '.join(missing)}")
            if extra:
                out.append(f"Parameters names what the signature does not have: {', '.join(extra)}")
            if bad:
                out.append(f"Parameters has lines that are not `name : type` entries: {bad}")
            for p in params:
                if p.name not in entries:
                    continue
                type_text, desc = entries[p.name]
                if not type_text:
                    out.append(f"{p.name}: no type (`{p.name} : type`)")
                if not desc:
                    out.append(f"{p.name}: no description (indented lines under the entry)")
                if p.default is not p.empty:
                    # `name : None` (only the default is accepted) states it too
                    if not re.search(r"\b(default|optional)\b", type_text) and type_text != repr(p.default):
                        out.append(f"{p.name}: has a default ({p.default!r}) but its type line says neither "
                                   f"`default ...` nor `optional`")
                    stated = _stated_default(type_text)
                    if stated is not inspect.Parameter.empty and not (
                            stated == p.default and (stated is None) == (p.default is None)):
                        out.append(f"{p.name}: the docstring says default {stated!r}, the signature "
                                   f"{p.default!r}")
    if kind not in ("class", "property") and _returns_something(sig_source):
        if not any(s in sections and any(x.strip() for x in sections[s]) for s in ("Returns", "Yields")):
            out.append("returns a value but has no 'Returns' section")
    return out


# ---------------------------------------------------------------------------------------------
# The tests


def _param(entry):
    ident, module, *_ = entry
    marks = [pytest.mark.skip(reason="being documented")] if module in PENDING else []
    return pytest.param(*entry, id=ident, marks=marks)


@pytest.mark.parametrize("ident,module,kind,obj,sig_source", [_param(e) for e in ENTRIES])
def test_documented(ident, module, kind, obj, sig_source):
    found = problems(kind, obj, sig_source)
    assert not found, f"{ident} ({module}) is not fully documented:\n  " + "\n  ".join(found)


def test_every_public_name_is_checked():
    """Nothing public slips past the enumeration: each __all__ name (data aside) is an entry, and the
    public classes bring their methods."""
    checked = {e[0] for e in ENTRIES}
    for name in fi_cupy.__all__:
        assert name in DATA_NAMES or f"fi_cupy.{name}" in checked, name
    for cls, method in (("MultiLevelCascadeAttentionWrapper", "plan"), ("MultiLevelCascadeAttentionWrapper", "run"),
                        ("MultiLevelCascadeAttentionWrapper", "is_cuda_graph_enabled"),
                        ("BatchDecodeWithPagedKVCacheWrapper", "run_return_lse"),
                        ("BatchPrefillWithPagedKVCacheWrapper", "reset_workspace_buffer")):
        assert f"fi_cupy.{cls}.{method}" in checked, (cls, method)
    assert not any(e[0].endswith(".with_traceback") for e in ENTRIES)  # builtin members are not ours


def test_pending_names_real_modules():
    """PENDING holds only modules that public names come from (a typo would skip nothing)."""
    assert PENDING <= {e[1] for e in ENTRIES}, PENDING - {e[1] for e in ENTRIES}


# The checker itself: a docstring with each kind of fault, and one without.

def _good(x, y=1.5, out=None, stream=None):
    """Add.

    Parameters
    ----------
    x : array
        An input, shape ``(n,)``.
    y : float, default 1.5
        The other.
    out : array, optional
        Where to write.
    stream : int or None, default None
        The stream.

    Returns
    -------
    array
        x + y.
    """
    return x + y


def _bad(x, y=2, z=None, *args, **kwargs):
    """Add
    without a blank line.

    Parameters
    ----------
    x
        No type.
    y : int, default 3
        The stated default is wrong.
    w : int
        Not a parameter.
    """
    return x + y


def _in_place(x):
    """Write into x.

    Parameters
    ----------
    x : array
        Written.
    """
    x += 1


def test_checker_accepts_a_good_docstring():
    assert problems("function", _good, _good) == []
    assert problems("function", _in_place, _in_place) == []  # returns nothing: no Returns needed


def test_checker_names_each_fault():
    found = "\n".join(problems("function", _bad, _bad))
    for want in ("summary must be one line", "Parameters lacks: z", "does not have: w", "x: no type",
                 "says default 3, the signature 2", "no 'Returns' section"):
        assert want in found, (want, found)
    assert "args" not in found  # *args / **kwargs need no entry
    assert problems("function", lambda: None, lambda: None) == ["no docstring"]

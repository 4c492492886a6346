"""Custom attention variants compiled at run time: a C++ struct of hooks (how logits are transformed
and masked, how queries, keys and outputs are transformed) and its extra parameters, compiled with
NVRTC into the attention kernels (hooks in cuda_src/common/variant.cuh) in about a second, cached on
disk like every kernel.

Two ways to declare one:
- `AttentionVariant(name, decl, tensors=[(name, C type)], scalars=[(name, C type)])`, for new code;
- FlashInfer's: `jit_args=` of the batch wrappers (uri, dtype_q, dtype_kv, dtype_o, idtype,
  head_dim_qk, head_dim_vo, tensor names, tensor dtypes, scalar names, scalar dtypes, variant name,
  variant declaration, ...) and the modules of fi_cupy.jit (gen_customize_*_module(...).build_and_load())
  for single_*_with_jit_module.
run() takes the extra parameters after its usual positional arguments: tensors first, then scalars,
in declared order. The declaration reads FlashInfer's style (a struct deriving from
AttentionVariantBase, constructor (params, batch_idx, smem_ptr), REGISTER_* hooks, math::, the extra
parameters as params.<name>, params.get_qo_len / get_kv_len); cuda_src/common/variant.cuh lists the
hooks and their arguments.

What a variant runs on: the prefill kernels (the portable one, and on sm_90a the Hopper one at head dims
64 / 128, as "auto" / "fa3" pick it), for single, ragged and paged
prefill; decode on the tensor-core decode kernel (K/V of the q dtype, head dims up to 256: takes_variant in
fi_cupy/decode.py), else through the paged prefill kernel; q fp16/bf16, K/V the q dtype or fp8; causal,
sliding window and custom masks apply besides the variant's own mask. A prefill plan never cuts a request's
KV range (its output is formed in one place, so OutputTransform sees whole rows); a decode plan cuts only for
softmax variants without an OutputTransform (decode.variant_split). Not with one: RoPE on the fly, ALiBi,
logits_soft_cap, sm_scale, q / k scales (the variant owns the logits), attention sinks; lse only for softmax
variants.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import re
from dataclasses import dataclass

from ._core import checks
from ._core import dtypes as dt
from ._core.kernels import StructArg, DevPtr, struct_arg

# C types of extra tensors (the array dtype they must have) and scalars (how they are packed).
TENSOR_TYPES = {
    "float": dt.float32, "double": dt.float64, "half": dt.float16, "__half": dt.float16, "nv_half": dt.float16,
    "nv_bfloat16": dt.bfloat16, "__nv_bfloat16": dt.bfloat16, "int": dt.int32, "int32_t": dt.int32,
    "int64_t": dt.int64, "uint8_t": dt.uint8, "int8_t": dt.int8, "uint32_t": dt.uint32, "bool": dt.bool_,
}
SCALAR_TYPES = {
    "double": ctypes.c_double, "float": ctypes.c_float, "int": ctypes.c_int32, "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32, "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "bool": ctypes.c_bool,
}
# The C++ spelling of each tensor type inside namespace fic (half / bf16 are fic's typedefs).
_CPP_TENSOR = {"half": "half_t", "__half": "half_t", "nv_half": "half_t", "nv_bfloat16": "bf16_t",
               "__nv_bfloat16": "bf16_t", "int8_t": "signed char"}
# The fields FIC_VARIANT_PARAMS_BASE (cuda_src/common/variant.cuh) starts every Params struct with.
PARAMS_BASE = (("fic_qo_indptr", ctypes.c_void_p), ("fic_kv_lens", ctypes.c_void_p), ("num_qo_heads", ctypes.c_int32),
               ("num_kv_heads", ctypes.c_int32))
# The kernels' variant parameter without a variant (NoVariant::Params in cuda_src/common/variant.cuh: 8 bytes).
NO_VARIANT = struct_arg("q", 0)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _pairs(arg: str, items) -> tuple:
    """((name, C type), ...) of a declared parameter list, checked."""
    out = []
    for i, item in enumerate(items or ()):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"{arg}: expected (name, C type) pairs, got {item!r} at {i}")
        out.append((str(item[0]), str(item[1])))
    return tuple(out)


@dataclass(frozen=True)
class AttentionVariant:
    """A custom attention variant: C++ hooks compiled into the prefill kernel at their first call.

    Pass it as a wrapper's jit_args, or as the jit_module of single_*_with_jit_module; run() then takes
    its extra parameters after the usual positional arguments (tensors, then scalars).

    Parameters
    ----------
    name : str
        The C++ struct `decl` defines.
    decl : str
        The struct, deriving from AttentionVariantBase (cuda_src/common/variant.cuh lists the hooks).
    tensors : sequence of (str, str), default ()
        Extra device arrays as (name, C type) pairs, read in the hooks as params.<name> (a pointer to
        the first element); C types: float, double, half, nv_bfloat16, int32_t, int64_t, uint8_t, ...
    scalars : sequence of (str, str), default ()
        Extra scalars as (name, C type) pairs (double, float, int32_t, int64_t, uint32_t, bool).
    uri : str, default ""
        FlashInfer's module name, kept for reference.
    """
    name: str
    decl: str
    tensors: tuple = ()
    scalars: tuple = ()
    uri: str = ""

    def __post_init__(self):
        object.__setattr__(self, "tensors", _pairs("tensors", self.tensors))
        object.__setattr__(self, "scalars", _pairs("scalars", self.scalars))
        if not isinstance(self.name, str) or not _IDENT.match(self.name):
            raise ValueError(f"variant name: expected a C++ identifier, got {self.name!r}")
        if not isinstance(self.decl, str) or not re.search(rf"\b(struct|class)\s+{re.escape(self.name)}\b", self.decl):
            raise ValueError(f"variant declaration: expected it to define struct {self.name}")
        seen = set()
        for kind, pairs, table in (("tensor", self.tensors, TENSOR_TYPES), ("scalar", self.scalars, SCALAR_TYPES)):
            for n, ctype in pairs:
                if not _IDENT.match(n) or n in seen or n in dict(PARAMS_BASE) or n.startswith("fic_"):
                    raise ValueError(f"variant {kind} name: {n!r} is not a C++ identifier, repeats a name, or is "
                                     f"one of the fields every variant's params have ({', '.join(dict(PARAMS_BASE))})")
                seen.add(n)
                if ctype not in table:
                    raise TypeError(f"variant {kind} {n}: C type {ctype!r} is not supported; expected one of "
                                    f"{', '.join(table)}")

    @property
    def use_softmax(self) -> bool:
        """The declaration's `use_softmax` (AttentionVariantBase's true unless it sets false)."""
        m = re.search(r"\buse_softmax\s*=\s*(true|false)\b", self.decl)
        return m is None or m.group(1) == "true"

    @property
    def transforms_output(self) -> bool:
        """Whether the declaration defines an OutputTransform (a decode plan then never cuts KV ranges,
        whose lse merge assumes the default one)."""
        return re.search(r"\bOutputTransform\b|\bREGISTER_OUTPUT_TRANSFORM\b", self.decl) is not None

    def _refuse_owned(self, pos_encoding_mode: str, sm_scale, logits_soft_cap: float) -> None:
        """NotImplementedError for the plan options that the variant owns (its logits), unless at their defaults."""
        for name, val, default in (("pos_encoding_mode", pos_encoding_mode, "NONE"), ("sm_scale", sm_scale, None),
                                   ("logits_soft_cap", logits_soft_cap, 0.0)):
            if val != default:
                raise NotImplementedError(f"{name}: {val!r} with custom variant {self.name}: the variant owns the "
                                          f"logits (its LogitsTransform and sm_scale_log2); leave {name} at "
                                          f"{default!r}")

    # -- compile ---------------------------------------------------------------------------------------

    @property
    def _namespace(self) -> str:
        h = hashlib.sha256(repr((self.name, self.decl, self.tensors, self.scalars)).encode()).hexdigest()[:12]
        return f"variant_{h}"

    @property
    def binding(self) -> str:
        """The kernel's template argument: fic::<namespace>::Binding."""
        return f"fic::{self._namespace}::Binding"

    def _fields(self) -> list:
        """(name, ctypes type) of the Params struct in order: the base, the tensors, then the scalars
        widest first, so no field but the last needs padding before it (the compile checks the size,
        which any disagreement between the two layouts would change)."""
        scalars = sorted(self.scalars, key=lambda nt: -ctypes.sizeof(SCALAR_TYPES[nt[1]]))
        return list(PARAMS_BASE) + [(n, ctypes.c_void_p) for n, _ in self.tensors] + \
            [(n, SCALAR_TYPES[t]) for n, t in scalars]

    def _layout(self) -> type:
        """The Params struct's layout (ctypes follows the C rules the device compiler uses); made once per
        variant (a ctypes type costs ~30 us to build, and run() packs one each call)."""
        return _layout_of(self)

    def _sources(self) -> tuple:
        """(label, text) pieces appended to prefill.cu: the Params struct, the user's declaration (its
        own label, so NVRTC's messages give the user's line numbers), the binding and the layout checks."""
        ns = self._namespace
        ctype = dict(self.tensors + self.scalars)
        fields = "".join(f"  {_CPP_TENSOR.get(ctype[n], ctype[n])}* {n};\n" if t is ctypes.c_void_p else
                         f"  {ctype[n]} {n};\n" for n, t in self._fields()[len(PARAMS_BASE):])
        head = f"namespace fic {{\nnamespace {ns} {{\nstruct Params {{\n  FIC_VARIANT_PARAMS_BASE\n{fields}}};\n"
        size = ctypes.sizeof(self._layout())
        tail = (f"using Binding = VariantBinding<{self.name}, Params>;\n}}  // namespace {ns}\n}}  // namespace fic\n"
                f"static_assert(sizeof(fic::{ns}::Params) == {size}, \"fi_cupy: variant params size (the Python side "
                f"computes {size})\");\n")
        return (("fi_cupy variant params", head), (f"variant {self.name}", self.decl + "\n"),
                ("fi_cupy variant binding", tail))

    # -- run -------------------------------------------------------------------------------------------

    def _pack(self, c, args: tuple, qo_indptr: int, kv_lens: int, num_qo_heads: int, num_kv_heads: int) -> StructArg:
        """The kernel's Params argument from run()'s extra positional arguments (tensors, then scalars),
        each tensor described on Call c (its device, dtype and stream checked)."""
        want = len(self.tensors) + len(self.scalars)
        if len(args) != want:
            names = [n for n, _ in self.tensors + self.scalars]
            raise TypeError(f"run(): variant {self.name} takes {want} extra positional arguments ({', '.join(names)}: "
                            f"tensors, then scalars), got {len(args)}")
        lay = self._layout()()
        lay.fic_qo_indptr, lay.fic_kv_lens = qo_indptr, kv_lens
        lay.num_qo_heads, lay.num_kv_heads = num_qo_heads, num_kv_heads
        ptrs = []
        for (n, t), a in zip(self.tensors, args):
            info = c.arg(a, n)
            checks.dtype_is(info, TENSOR_TYPES[t], f"{TENSOR_TYPES[t]} (declared {t})")
            setattr(lay, n, info.ptr)
            ptrs.append(DevPtr(info.ptr))
        for (n, t), a in zip(self.scalars, args[len(self.tensors):]):
            setattr(lay, n, _scalar(n, t, a))
        b = StructArg(bytes(lay))
        b.ptrs = tuple(p for p in ptrs if p)
        return b


@functools.lru_cache(maxsize=None)
def _layout_of(variant: AttentionVariant) -> type:
    return type(f"{variant.name}Params", (ctypes.Structure,), {"_fields_": variant._fields()})


def _scalar(name: str, ctype: str, value):
    """A scalar extra parameter as its declared C type takes it."""
    if hasattr(value, "__dlpack_device__") or hasattr(value, "shape") and getattr(value, "shape", ()) != ():
        raise TypeError(f"{name}: a scalar parameter ({ctype}) takes a Python number, got {type(value).__name__}")
    if ctype == "bool":
        return bool(value)
    if ctype in ("double", "float"):
        if not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise TypeError(f"{name}: expected a number ({ctype}), got {value!r}")
        return float(value)
    return checks.int_arg(name, value)


def check_variant_run(variant: AttentionVariant | None, return_lse: bool, sinks, qk_scale: float = 1.0) -> None:
    """What a run() with a custom variant cannot give: an lse without softmax, attention sinks, a q or k
    scale (the variant's LogitsTransform takes the raw q.k: fold the scale into its own parameters)."""
    if variant is None:
        return
    if return_lse and not variant.use_softmax:
        raise NotImplementedError(f"return_lse: variant {variant.name} has no softmax (use_softmax = false), so its "
                                  f"rows have no log-sum-exp")
    checks.unsupported("sinks", sinks)
    if qk_scale != 1.0:
        raise NotImplementedError(f"q_scale / k_scale: {qk_scale!r} (their product) with custom variant "
                                  f"{variant.name}: its LogitsTransform takes the raw q.k; fold the scale into the "
                                  f"variant's own parameters and pass None")


def from_jit_args(jit_args, where: str) -> AttentionVariant:
    """An AttentionVariant from a wrapper's jit_args: one itself, or FlashInfer's tuple (uri, dtype_q,
    dtype_kv, dtype_o, idtype, head_dim_qk, head_dim_vo, tensor names, tensor dtypes, scalar names,
    scalar dtypes, variant name, variant declaration[, flags...]); the dtypes and head dims in it are
    FlashInfer's compile-time choices, which plan() takes here."""
    if isinstance(jit_args, AttentionVariant):
        return jit_args
    if isinstance(jit_args, JitModule):
        return jit_args.variant
    if not isinstance(jit_args, (tuple, list)) or len(jit_args) < 13:
        raise TypeError(f"jit_args: expected an AttentionVariant or FlashInfer's jit_args tuple (uri, dtype_q, "
                        f"dtype_kv, dtype_o, idtype, head_dim_qk, head_dim_vo, additional_tensor_names, "
                        f"additional_tensor_dtypes, additional_scalar_names, additional_scalar_dtypes, variant_name, "
                        f"variant_decl, ...) for {where}, got {type(jit_args).__name__}"
                        f"{'' if not isinstance(jit_args, (tuple, list)) else f' of {len(jit_args)} items'}")
    a = list(jit_args)
    _flags(a[13:], ("pos_encoding_mode", "use_sliding_window", "use_logits_soft_cap", "use_fp16_qk_reduction"))
    return _variant(a[0], a[7], a[8], a[9], a[10], a[11], a[12])


def _variant(uri, tensor_names, tensor_dtypes, scalar_names, scalar_dtypes, name, decl) -> AttentionVariant:
    for arg, names, types in (("additional_tensor", tensor_names, tensor_dtypes),
                              ("additional_scalar", scalar_names, scalar_dtypes)):
        if len(list(names or ())) != len(list(types or ())):
            raise ValueError(f"{arg}_names and {arg}_dtypes: {len(list(names or ()))} names but "
                             f"{len(list(types or ()))} dtypes")
    return AttentionVariant(name, decl, tuple(zip(tensor_names or (), map(_ctype, tensor_dtypes or ()))),
                            tuple(zip(scalar_names or (), map(_ctype, scalar_dtypes or ()))), str(uri))


def _ctype(x) -> str:
    """FlashInfer's dtype strings are C types already ("uint8_t", "double"); torch / numpy dtypes name theirs."""
    if isinstance(x, str):
        return x
    d = dt.as_dtype(x, "additional dtype")
    for c, want in TENSOR_TYPES.items():
        if want == d:
            return c
    raise TypeError(f"additional dtype: {d} has no C type a variant takes")


def _flags(values, names) -> None:
    """FlashInfer's trailing compile flags of a jit_args tuple: only their defaults (the variant owns
    positions, windows and caps)."""
    for n, v in zip(names, values):
        if v not in (0, False, None, "NONE"):
            raise NotImplementedError(f"jit_args: {n}={v!r} is not supported with a custom variant (its defaults "
                                      f"only: the variant owns the logits; windows are a plan() option)")


@dataclass(frozen=True)
class JitModule:
    """What FlashInfer's gen_customize_*_module(...).build_and_load() gives, for single_*_with_jit_module:
    the variant and the module's compile-time choices. Nothing is compiled until the first call (the
    kernel's tile depends on the shapes); later calls and processes reuse the disk cache."""
    variant: AttentionVariant
    kind: str            # "single_prefill", "single_decode", "batch_prefill", "batch_decode"
    backend: str = "auto"  # prefill modules: FlashInfer's backend argument ("fa2": the portable kernel only)

    def build_and_load(self) -> "JitModule":
        return self


def as_variant(x, arg: str) -> AttentionVariant:
    """A variant from a jit_module argument: a JitModule or an AttentionVariant."""
    if isinstance(x, JitModule):
        return x.variant
    if isinstance(x, AttentionVariant):
        return x
    raise TypeError(f"{arg}: expected a module of fi_cupy.jit (gen_customize_*_module(...).build_and_load()) or an "
                    f"AttentionVariant, got {type(x).__name__}")


_named: dict = {}  # (kind, module name) -> JitModule: get_batch_*_jit_module's cache


def named_module(module_name, jit_module, kind: str) -> JitModule:
    """FlashInfer's get_batch_{prefill,decode}_jit_module: the variant module `jit_module` (a JitModule,
    an AttentionVariant or FlashInfer's jit_args tuple) as a `kind` module, cached by module_name as
    FlashInfer caches its loaded modules (a name asked again gives the first module made under it)."""
    if not isinstance(module_name, str) or not module_name:
        raise TypeError(f"module_name: expected a non-empty str, got {module_name!r}")
    got = _named.get((kind, module_name))
    if got is None:
        backend = jit_module.backend if isinstance(jit_module, JitModule) else "auto"
        got = _named[(kind, module_name)] = JitModule(from_jit_args(jit_module, "jit_module"), kind, backend)
    return got


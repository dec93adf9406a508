"""quantize_model: turn a Llama-family model into its fake-quantized version, as Atom does.

Stages (each switched on by the QuantConfig):
  1. validate the config against the model's dimensions (before touching any weight)
  2. calibration statistics of every linear input (reordering and static scales need them)
  3. outlier reordering folded into the weights (outliers > 0)
  4. every decoder linear (q/k/v/o/gate/up/down) replaced by a QuantLinear; the linears that read
     one input share one ActQuantizer (none when a_bits == 16: "W4A16" means weights only)
  5. weights: RTN, or GPTQ layer by layer: the calibration windows run through the already
     quantized earlier layers; each linear input's Hessian is collected AFTER its activation
     quantizer; q/k/v, then o, then gate/up, then down are quantized in that order, each seeing
     the earlier ones quantized; the layer's outputs then feed the next layer
  6. KV-cache fake-quant (kv_bits < 16)
lm_head and the embeddings stay in floating point unless quant.quantize_lm_head (RTN weights,
dynamic activations, no outliers: its input is not reordered).
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from atom_lab.calibration import LINEAR_INPUTS, collect_input_stats
from atom_lab.config import ConfigError, QuantConfig
from atom_lab.formats import MixedQuantized
from atom_lab.gptq import HessianAccumulator, gptq_quantize_weight
from atom_lab.kv import apply_kv_quant
from atom_lab.models import decoder_layers, model_dims
from atom_lab.qlinear import ActQuantizer, QuantLinear
from atom_lab.reorder import apply_reorder, reorder_indices, reorder_stats
from atom_lab.weights import WeightSpec, rtn_quantize_weight

INPUT_ORDER = ("qkv", "o", "gate_up", "down")  # the order a decoder layer consumes its inputs


def quantize_model(model, qcfg, calib_windows: torch.Tensor | None = None, device=None,
                   progress: bool = True, stats=None, cache_key: str | None = None,
                   cache_dir=None, batch_size: int = 8) -> dict:
    """Quantize `model` in place per `qcfg` (QuantConfig or mapping); returns a summary dict.

    calib_windows [N, L] token ids are needed for reordering, static scales and GPTQ (unless
    `stats`, the output of calibration.collect_input_stats on the unreordered model, is given and
    GPTQ is off). `device`: where calibration and GPTQ run (default: the model's device).
    """
    start = time.perf_counter()
    qcfg = QuantConfig.coerce(qcfg)
    qcfg.validate_for_model(*model_dims(model))
    _check_model_not_quantized(model)
    use_gptq = qcfg.quantizes_weights and qcfg.weight_method == "gptq"
    reorders = qcfg.reorder and qcfg.outliers > 0
    static = qcfg.quantizes_activations and not qcfg.dynamic
    if qcfg.quantize_lm_head and static:
        raise ConfigError("quant.quantize_lm_head=True needs quant.dynamic=True: the lm_head "
                          "input has no calibration statistics for static scales")
    if ((reorders or static) and stats is None or use_gptq) and calib_windows is None:
        raise ConfigError(f"quant config {qcfg.name!r} needs calibration windows (outliers="
                          f"{qcfg.outliers}, dynamic={qcfg.dynamic}, weight_method="
                          f"{qcfg.weight_method!r}); pass calib_windows")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    times = {}

    def stage(name, t0):
        times[name] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    if (reorders or static) and stats is None:
        stats = collect_input_stats(model, calib_windows, device, progress, cache_key, cache_dir)
    stage("calibration", t0)

    t0 = time.perf_counter()
    if reorders:
        indices = reorder_indices(stats, qcfg.reorder_metric)
        apply_reorder(model, indices)
        stats = reorder_stats(stats, indices)
    stage("reorder", t0)

    n_linears = n_act = 0
    if qcfg.quantizes_weights or qcfg.quantizes_activations:
        n_linears, n_act = install_quant_linears(model, qcfg, stats if static else None)
    t0 = time.perf_counter()
    if use_gptq:
        gptq_model(model, qcfg, calib_windows, device, progress, batch_size)
    elif qcfg.quantizes_weights:
        rtn_model(model, qcfg, progress)
    if qcfg.quantize_lm_head:
        n_linears += quantize_lm_head(model, qcfg)
    stage("weights", t0)

    t0 = time.perf_counter()
    if qcfg.quantizes_kv:
        apply_kv_quant(model, qcfg)
    stage("kv", t0)
    times["total"] = round(time.perf_counter() - start, 3)
    quant_linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return {
        "quant": qcfg.name,
        "linears_quantized": n_linears,
        "act_quantizers": n_act,
        "packed_weights": sum(m.packed_weight is not None for m in quant_linears),
        "weight_method": qcfg.weight_method if qcfg.quantizes_weights else "none",
        "reordered": reorders,
        "kv_quant": qcfg.quantizes_kv,
        "calib_tokens": 0 if calib_windows is None else int(calib_windows.numel()),
        "time_s": times,
    }


def _check_model_not_quantized(model) -> None:
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model already holds QuantLinear modules; quantize a freshly loaded model")


def make_act_quantizer(qcfg: QuantConfig, outliers: int | None = None) -> ActQuantizer | None:
    """The ActQuantizer a QuantConfig asks for, or None when activations stay in floating point."""
    if not qcfg.quantizes_activations:
        return None
    return ActQuantizer(bits=qcfg.a_bits, group_size=qcfg.group_size, clip=qcfg.a_clip,
                        outliers=qcfg.outliers if outliers is None else outliers,
                        outlier_bits=qcfg.outlier_bits, dynamic=qcfg.dynamic,
                        static_granularity=qcfg.static_granularity)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def install_quant_linears(model, qcfg: QuantConfig, stats=None) -> tuple[int, int]:
    """Replace the decoder linears by QuantLinear (weights still FP). stats (reordered order)
    calibrate static activation scales. Returns (linears replaced, activation quantizers)."""
    n_linears = n_act = 0
    for i, layer in enumerate(decoder_layers(model)):
        for name, paths in LINEAR_INPUTS.items():
            act = make_act_quantizer(qcfg)
            if act is not None:
                n_act += 1
                if stats is not None:
                    act.calibrate(stats[i][name]["abs_max"])
                    act.to(layer.get_submodule(paths[0]).weight.device)
            for path in paths:
                _set_submodule(layer, path, QuantLinear.from_linear(layer.get_submodule(path), act))
                n_linears += 1
    return n_linears, n_act


def _layer_quant_linears(layer) -> list[QuantLinear]:
    return [layer.get_submodule(p) for name in INPUT_ORDER for p in LINEAR_INPUTS[name]]


@torch.no_grad()
def rtn_model(model, qcfg: QuantConfig, progress: bool = True) -> None:
    spec = WeightSpec.from_config(qcfg)
    for layer in tqdm(decoder_layers(model), desc="RTN weights", unit="layer", disable=not progress):
        for linear in _layer_quant_linears(layer):
            linear.set_weight(*rtn_quantize_weight(linear.weight, spec))


@torch.no_grad()
def quantize_lm_head(model, qcfg: QuantConfig) -> int:
    head = model.get_output_embeddings()
    if head is None or isinstance(head, QuantLinear):
        return 0
    qhead = QuantLinear.from_linear(head, make_act_quantizer(qcfg, outliers=0))
    qhead.set_weight(*rtn_quantize_weight(head.weight, WeightSpec.from_config(qcfg, outliers=0)))
    model.set_output_embeddings(qhead)
    return 1


class _StopForward(Exception):
    """Raised by an observer once it has what it needs from a layer's forward."""


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


@torch.no_grad()
def capture_layer_inputs(model, windows: torch.Tensor, device, batch_size: int):
    """Inputs of decoder layer 0 per batch of windows: ([hidden [B, L, H]], [layer kwargs])."""
    layer0 = decoder_layers(model)[0]
    hidden, kwargs_list = [], []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(x.to(device))
        kwargs_list.append({k: _to_device(v, device) for k, v in kwargs.items()})
        raise _StopForward

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    body = getattr(model, "model", model)
    model_device = body.get_input_embeddings().weight.device
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                body(input_ids=windows[start:start + batch_size].to(model_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs_list


def _run_layer(layer, hidden, kwargs_list, keep_outputs: bool):
    outputs = []
    for x, kwargs in zip(hidden, kwargs_list):
        try:
            out = layer(x, **kwargs)
        except _StopForward:
            continue
        if keep_outputs:
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _split_packed(packed: MixedQuantized | None, rows: list[int]):
    if packed is None:
        return [None] * len(rows)
    parts = [torch.split(t, rows) for t in (packed.normal, packed.normal_scales, packed.outlier,
                                            packed.outlier_scales)]
    return [MixedQuantized(*(p[i] for p in parts), packed.bits, packed.group_size)
            for i in range(len(rows))]


def _input_hessian(layer, linear: QuantLinear, hidden, kwargs_list, device) -> torch.Tensor:
    """H of `linear`'s input as the GEMM sees it (after its activation quantizer)."""
    acc = HessianAccumulator(linear.in_features, device)

    def observe(x):
        acc.add(x)
        raise _StopForward  # the rest of the layer is not needed for this Hessian

    linear.input_observer = observe
    try:
        _run_layer(layer, hidden, kwargs_list, keep_outputs=False)
    finally:
        linear.input_observer = None
    return acc.hessian


@torch.no_grad()
def gptq_model(model, qcfg: QuantConfig, windows: torch.Tensor, device, progress: bool = True,
               batch_size: int = 8) -> None:
    """Sequential GPTQ over the decoder layers (see the module docstring)."""
    spec = WeightSpec.from_config(qcfg)
    hidden, kwargs_list = capture_layer_inputs(model, windows, device, batch_size)
    for layer in tqdm(decoder_layers(model), desc="GPTQ", unit="layer", disable=not progress):
        home = next(layer.parameters()).device
        layer.to(device)
        for name in INPUT_ORDER:
            linears = [layer.get_submodule(p) for p in LINEAR_INPUTS[name]]
            hessian = _input_hessian(layer, linears[0], hidden, kwargs_list, device)
            # linears sharing an input share its Hessian: one GPTQ over their stacked rows
            weight = torch.cat([lin.weight for lin in linears])
            w_hat, packed = gptq_quantize_weight(weight, hessian, spec, qcfg.percdamp,
                                                 qcfg.gptq_block, qcfg.act_order)
            rows = [lin.out_features for lin in linears]
            for lin, w, p in zip(linears, torch.split(w_hat, rows), _split_packed(packed, rows)):
                lin.set_weight(w, p)
        hidden = _run_layer(layer, hidden, kwargs_list, keep_outputs=True)
        layer.to(home)

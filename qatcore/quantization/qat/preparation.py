"""Model preparation: turn a float model into a QAT model.

**Graph mode** (the default) works on the traced graph:

1. trace the model (``qatcore.graph.trace``);
2. resolve every Linear and Conv2d layer's config (:class:`LayerwiseConfig`) and
   check that every override matches a layer;
3. fuse for QAT, for enabled layers whose intermediate values have one user:
   Conv2d -> BatchNorm2d (-> ReLU) becomes one :class:`QATConvBn2d` (the
   BatchNorm folded into the fake-quantized weight), Conv2d -> ReLU and
   Linear -> ReLU become a QAT layer with its ReLU fused;
4. replace every other enabled Linear/Conv2d by :class:`QATLinear` /
   :class:`QATConv2d`; each QAT layer fake-quantizes its weight (weights mode)
   and its output (activations mode);
5. insert activation ``FakeQuantize`` nodes where the int8 runtime will
   materialise a new tensor, as each node's operator rule says (its
   :class:`~qatcore.quantization.qat.operators.QATRole`): after the model inputs,
   after activations, after residual adds, multiplications and concatenations
   (after the activation instead when one follows), and after average pooling (a
   mean of grid values is off the grid). Ops whose outputs stay on their input's
   grid (max pooling, flatten, reshape, dropout, identity) get none. Finally, any
   quantized layer whose input would still arrive unquantized (after a float
   layer, say) gets a quantizer on that input. An operator without a rule is
   refused (:class:`~qatcore.quantization.qat.operators.UnregisteredOperatorError`).

Disabled layers stay the float modules, untouched. The traced model is never
changed: the QAT model's containers are its own, and it holds the float model's
very Parameters (and BatchNorm modules) so an optimizer made before
preparation keeps training it.

**Eager mode** (for models whose forward branches on tensor values, chosen
automatically when tracing raises TraceError): a structural copy of the model
sharing Parameters, with each enabled leaf Linear/Conv2d swapped for a QAT
layer that quantizes its input, its weight and its output. The input quantizer
(``<layer>.input_fake_quant``, the layer's activation spec) is there because the
code between two layers is the user's float code: the layer's int8 form needs its
input on a grid of its own. Each layer also gets an
:class:`~qatcore.quantization.qat.eager_conversion.EagerIntegerEval` as its
``interpreter``, so its eval forward without gradients is its int8 arithmetic.
No fusion: without a graph, nothing says a BatchNorm or ReLU follows a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from qatcore.errors import ConfigError
from qatcore.graph import GraphModule, find_chains, trace
from qatcore.graph.graph_module import Submodules
from qatcore.graph.node import Node
from qatcore.nn import functional as F
from qatcore.nn.container import ModuleList, Sequential
from qatcore.nn.embedding import Embedding
from qatcore.nn.module import Module
from qatcore.quantization.block_fake_quantize import make_fake_quantize
from qatcore.quantization.fake_quantize_module import FakeQuantize
from qatcore.quantization.qat.eager_conversion import EagerIntegerEval
from qatcore.quantization.qat.integer_eval import IntegerEval
from qatcore.quantization.qat.layerwise_config import LayerwiseConfig, ResolvedLayer
from qatcore.quantization.qat.operators import QATRole, rule_for_node, rule_for_target
from qatcore.quantization.qat.operators.weighted import QAT_FUSIONS
from qatcore.quantization.qat.qat_attention import QATAttention
from qatcore.quantization.qat.qat_layers import QATEmbedding, QATLayer

__all__ = ["LayerRecord", "prepare_graph_mode", "prepare_eager_mode", "quantizable_layers", "is_quantizable"]


@dataclass(frozen=True)
class LayerRecord:
    """What preparation did with one layer (``describe()`` prints these)."""

    name: str
    float_type: str
    qat_type: str
    resolved: ResolvedLayer
    fused: tuple[str, ...] = ()


def is_quantizable(module: Module) -> bool:
    """A layer with weights that the layer-wise config decides for (its rule is WEIGHTED)."""
    rule = rule_for_target(type(module))
    return rule is not None and rule.qat is QATRole.WEIGHTED


def quantizable_layers(model: Module) -> list[tuple[str, Module]]:
    return [(name, m) for name, m in model.named_modules() if name and is_quantizable(m)]


def _make_quantizers(resolved: ResolvedLayer, name: str) -> tuple[FakeQuantize | None, FakeQuantize | None]:
    """The layer's weight and output quantizers; a dynamic (per-token) activation spec gives
    no output quantizer: the layer quantizes its input instead (:func:`_quantize_dynamic_input`)."""
    config = resolved.config
    weight = make_fake_quantize(config.weight, f"{name}.weight") if config.mode.weights else None
    output = (FakeQuantize(config.activation, f"{name}.output")
              if config.mode.activations and not config.dynamic_activations else None)
    return weight, output


def _quantize_dynamic_input(layer: QATLayer, resolved: ResolvedLayer, name: str) -> None:
    """With per-token activations, the layer quantizes its own input (``<name>.input_fake_quant``),
    where torchao's 8da4w quantizes it, and activations are quantized nowhere else."""
    if resolved.config.dynamic_activations:
        layer.set_input_fake_quant(make_fake_quantize(resolved.config.activation, f"{name}.input"))


def _check_activation_placement(layerwise: LayerwiseConfig, layers: list[tuple[str, Module]]) -> None:
    """Per-token activations are quantized at layer inputs, observed ones at op outputs across the
    graph: one model uses one placement, the global config's."""
    dynamic = layerwise.global_config.dynamic_activations
    for name, module in layers:
        config = layerwise.resolve(name, module).config
        if config.mode.activations and config.dynamic_activations != dynamic:
            raise ConfigError(
                f"layer-wise config: layer {name!r} quantizes activations {config.activation.scheme.value} but the "
                f"global config {layerwise.global_config.activation.scheme.value}; per-token (dynamic) and "
                f"observed activations are placed differently (at layer inputs vs. after every op), so a model "
                f"uses one kind: change the override's activation spec, or its mode to weights_only")


def _embedding_layers(model: Module, names) -> list[tuple[str, Module]]:
    return [(name, model.get_submodule(name)) for name in names
            if isinstance(model.get_submodule(name), Embedding)]


def _prepare_embeddings(model: Module, embeddings, layerwise: LayerwiseConfig, place) -> list[LayerRecord]:
    """Each Embedding with an ``embedding`` spec replaced (``place(model, name, qat)``: registered
    in a graph module, or swapped in an eager copy) by its QATEmbedding; a record for each."""
    records = []
    for name, layer in embeddings:
        info = layerwise.resolve(name, layer)
        qat = _quantize_embedding(layer, info, name)
        if qat is not None:
            place(model, name, qat)
        records.append(LayerRecord(name, type(layer).__name__, type(qat or layer).__name__, info))
    return records


def _quantize_embedding(layer: Embedding, resolved: ResolvedLayer, name: str) -> QATEmbedding | None:
    """The QAT form of an Embedding whose resolved config has an ``embedding`` spec (None: it stays float)."""
    spec = resolved.config.embedding
    if not resolved.enabled or spec is None or not resolved.config.mode.weights:
        return None
    return QATEmbedding(layer, make_fake_quantize(spec, f"{name}.weight"))


def _register(gm: Module, path: str, module: Module) -> None:
    parent, _, leaf = path.rpartition(".")
    gm.get_submodule(parent).add_module(leaf, module)


# ---- graph mode ------------------------------------------------------------------------------
def prepare_graph_mode(model: Module, layerwise: LayerwiseConfig) -> tuple[GraphModule, list[LayerRecord]]:
    """Graph-mode preparation (module docstring); raises TraceError if untraceable."""
    gm = trace(model)
    called = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    layers = [(name, m) for name, m in called.items() if is_quantizable(m)]
    embeddings = _embedding_layers(gm, called)
    layerwise.check_matches(layers + embeddings)
    _check_activation_placement(layerwise, layers)
    resolved = {name: layerwise.resolve(name, m) for name, m in layers}
    records: list[LayerRecord] = []
    replaced: set[str] = set()

    def enabled(node: Node) -> bool:
        return node.target in resolved and resolved[node.target].enabled

    for pattern, fuse in QAT_FUSIONS:
        for chain in find_chains(gm, pattern):
            head = chain[0]
            if head.target in replaced or not enabled(head):
                continue
            modules = [gm.get_submodule(n.target) for n in chain]
            info = resolved[head.target]
            weight_fq, output_fq = _make_quantizers(info, head.target)
            qat = fuse(modules, [n.target for n in chain], weight_fq, output_fq)
            if qat is None:
                continue
            _quantize_dynamic_input(qat, info, head.target)
            _replace_chain(gm, chain, head.target, qat)
            replaced.add(head.target)
            records.append(LayerRecord(head.target, type(modules[0]).__name__, type(qat).__name__, info,
                                       tuple(n.target for n in chain[1:])))
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in replaced or node.target not in resolved:
            continue
        layer = gm.get_submodule(node.target)
        info = resolved[node.target]
        if not info.enabled:
            records.append(LayerRecord(node.target, type(layer).__name__, type(layer).__name__, info))
            continue
        weight_fq, output_fq = _make_quantizers(info, node.target)
        qat = rule_for_target(type(layer)).to_qat(layer, weight_fq, output_fq)
        _quantize_dynamic_input(qat, info, node.target)
        _register(gm, node.target, qat)
        replaced.add(node.target)
        records.append(LayerRecord(node.target, type(layer).__name__, type(qat).__name__, info))
    records.extend(_prepare_embeddings(gm, embeddings, layerwise, _register))
    if layerwise.global_config.dynamic_activations:
        gm.add_module("activation_fake_quant", Submodules())  # none: each layer quantizes its input
    else:
        _insert_activation_quantizers(gm, layerwise)
    _quantize_attention(gm, layerwise.global_config)
    _link_input_quantizers(gm)
    gm.lint()
    if not any(isinstance(m, FakeQuantize) and m.dynamic for m in gm.modules()):
        gm.interpreter = IntegerEval()  # eval without gradients computes the int8 arithmetic
    records.sort(key=lambda r: list(called).index(r.name) if r.name in called else 0)
    return gm, records


def _replace_chain(gm: GraphModule, chain: list[Node], name: str, module: Module) -> None:
    """One call of ``module`` (registered at ``name``) instead of the chain; the chain's
    other modules (a folded BatchNorm, a fused ReLU) stay registered, so the model's
    state_dict keys do not move."""
    _register(gm, name, module)
    graph = gm.graph
    new = graph.insert_after(chain[-1], "call_module", name, chain[0].args, dict(chain[0].kwargs))
    new.meta.update(chain[-1].meta)
    chain[-1].replace_all_uses_with(new)
    for node in reversed(chain):
        graph.erase(node)
    graph.rename(new, chain[0].name)


def _rule_of(gm: GraphModule, node: Node):
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    return rule_for_node(node, module), module


def _produces_quantized_value(gm: GraphModule, node: Node) -> str:
    """'layer' (a quantizer, or a QAT layer that quantizes its own output), 'new' (needs a
    quantizer after it), 'same' (keeps its input's grid) or 'float' (not quantized), from the
    node's operator rule."""
    if node.op == "input":
        return "new"
    if node.op not in ("call_module", "call_function"):
        return "float"
    rule, module = _rule_of(gm, node)
    role = rule.qat
    if role is QATRole.QUANTIZER:
        return "float" if isinstance(module, QATLayer) and module.output_fake_quant is None else "layer"
    if role in (QATRole.ACTIVATION, QATRole.NEW_GRID):
        return "new"
    if role is QATRole.INPUT_GRID:
        return "same"
    return "float"


def _followed_by_activation(gm: GraphModule, node: Node) -> bool:
    if len(node.users) != 1:
        return False
    (user,) = node.users
    return user.op in ("call_module", "call_function") and _rule_of(gm, user)[0].qat is QATRole.ACTIVATION


def _read_only_as_indices(gm: GraphModule, node: Node) -> bool:
    """Every user of ``node`` reads it as the integer indices of an operator whose rule says
    ``index_input`` (an embedding lookup)."""
    return all(user.op in ("call_module", "call_function") and user.args and user.args[0] is node
               and _rule_of(gm, user)[0].index_input for user in node.users)


def _insert_quantizer_after(gm: GraphModule, holder: Submodules, node: Node, spec) -> Node:
    name = node.name
    holder.add_module(name, FakeQuantize(spec, f"activation_fake_quant.{name}"))
    graph = gm.graph
    fq = graph.insert_after(node, "call_module", f"activation_fake_quant.{name}", (node,))
    fq.meta.update(node.meta)
    for user in list(node.users):
        if user is not fq:
            user.replace_input_with(node, fq)
    return fq


def _insert_activation_quantizers(gm: GraphModule, layerwise: LayerwiseConfig) -> None:
    config = layerwise.global_config
    holder = Submodules()
    gm.add_module("activation_fake_quant", holder)
    if config.mode.activations:
        for node in gm.graph.nodes:
            kind = _produces_quantized_value(gm, node)
            if kind != "new" or not node.users or all(u.op == "output" for u in node.users):
                continue
            if _read_only_as_indices(gm, node):
                continue  # token indices: integers already, and never dequantized
            if (node.op != "input" and _rule_of(gm, node)[0].quantize_after_activation
                    and _followed_by_activation(gm, node)):
                continue  # quantized after the activation instead
            spec = config.activation
            if node.op == "call_module":
                resolved = layerwise.resolve(node.target, gm.get_submodule(node.target))
                if not resolved.enabled:
                    continue
                spec = resolved.config.activation
            _insert_quantizer_after(gm, holder, node, spec)
    # any quantized layer whose input arrives unquantized gets a quantizer on that input
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, QATLayer) or not node.args or not isinstance(node.args[0], Node):
            continue
        if module.output_fake_quant is None and module.weight_fake_quant is not None and not config.mode.activations:
            continue  # weights-only model: activations stay float by design
        source = node.args[0]
        while _produces_quantized_value(gm, source) == "same" and source.args and isinstance(source.args[0], Node):
            source = source.args[0]
        if _produces_quantized_value(gm, source) in ("layer",) or source.op == "input" and config.mode.activations:
            continue
        spec = module.output_fake_quant.spec if module.output_fake_quant is not None else config.activation
        _insert_quantizer_after(gm, holder, source, spec)


def _quantize_attention(gm: GraphModule, config) -> None:
    """With an ``attention`` spec, every ``F.scaled_dot_product_attention`` call becomes a call
    of a :class:`QATAttention` (``attention_fake_quant.<node>``) with the same arguments."""
    if config.attention is None:
        return
    holder = Submodules()
    gm.add_module("attention_fake_quant", holder)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        holder.add_module(node.name, QATAttention(config.attention, f"attention_fake_quant.{node.name}"))
        new = gm.graph.insert_after(node, "call_module", f"attention_fake_quant.{node.name}", node.args,
                                    dict(node.kwargs))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase(node)
        gm.graph.rename(new, node.name)


def _link_input_quantizers(gm: GraphModule) -> None:
    """Tell each QAT layer which quantizer defines its input (through scale-keeping ops)."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], Node):
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, QATLayer):
            continue
        source = node.args[0]
        while _produces_quantized_value(gm, source) == "same" and source.args and isinstance(source.args[0], Node):
            source = source.args[0]
        if source.op == "call_module":
            producer = gm.get_submodule(source.target)
            quantizer = producer.output_fake_quant if isinstance(producer, QATLayer) else producer
            if isinstance(quantizer, FakeQuantize):
                layer.set_reference("input_quantizer", quantizer)


# ---- eager mode ------------------------------------------------------------------------------
def _structural_copy(module: Module) -> Module:
    """A copy of the module tree sharing every Parameter, buffer and leaf module, so
    swapping layers in the copy leaves the original's structure untouched."""
    children = list(module.named_children())
    if not children or is_quantizable(module):
        return module
    clone = module.copy_structure()
    for name, child in children:
        clone.add_module(name, _structural_copy(child))
    return clone


def prepare_eager_mode(model: Module, layerwise: LayerwiseConfig, inplace: bool) -> tuple[Module, list[LayerRecord]]:
    """Eager-mode preparation (module docstring)."""
    if layerwise.global_config.attention is not None:
        raise ConfigError("the attention spec quantizes the inputs of F.scaled_dot_product_attention calls, which "
                          "only a traced graph shows; this model is prepared in eager mode (its forward could not "
                          "be traced, or mode='eager' was asked for): leave QuantizationConfig.attention None, or "
                          "make the model traceable")
    qat_model = model if inplace else _structural_copy(model)
    layers = quantizable_layers(qat_model)
    embeddings = [(name, m) for name, m in qat_model.named_modules() if name and isinstance(m, Embedding)]
    layerwise.check_matches(layers + embeddings)
    _check_activation_placement(layerwise, layers)
    records = []
    for name, layer in layers:
        info = layerwise.resolve(name, layer)
        if not info.enabled:
            records.append(LayerRecord(name, type(layer).__name__, type(layer).__name__, info))
            continue
        weight_fq, output_fq = _make_quantizers(info, name)
        qat = rule_for_target(type(layer)).to_qat(layer, weight_fq, output_fq)
        if info.config.mode.activations:
            qat.set_input_fake_quant(make_fake_quantize(info.config.activation, f"{name}.input"))
        if not (info.config.dynamic_activations or (weight_fq is not None and weight_fq.dynamic)):
            qat.interpreter = EagerIntegerEval(name, info.config.requantization)
        _swap(qat_model, name, qat)
        records.append(LayerRecord(name, type(layer).__name__, type(qat).__name__, info))
    records.extend(_prepare_embeddings(qat_model, embeddings, layerwise, _swap))
    return qat_model, records


def _swap(model: Module, name: str, module: Module) -> None:
    parent, _, leaf = name.rpartition(".")
    holder = model.get_submodule(parent)
    if isinstance(holder, (Sequential, ModuleList)):
        holder.add_module(leaf, module)
    else:
        setattr(holder, leaf, module)

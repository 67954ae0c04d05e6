"""Composition of K LoRA modules into one LoRA slot of a model.

Merge methods are small functions chosen by name (``MERGE_METHODS``), mergekit style. The
default, ``linear``, is the reference ``lorahub`` 0.1.0 rule: composed ``A = Σ wᵢ·Aᵢ`` and
``B = Σ wᵢ·Bᵢ``, with A and B summed separately.

:class:`LoraComposer` wraps the base model with PEFT once, stacks the K modules' tensors once
into a ``[K, n]`` matrix, and makes every LoRA parameter of the model a view into one flat
buffer of length ``n``. A search step is then one matrix-vector product written in place (for a
subset of at most half of the modules, one pass over each of its rows): no re-wrapping of the
model and no copies of state dicts.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Sequence

import torch

from lorahub_ray.errors import IncompatibleModulesError
from lorahub_ray.core.modules import LoraModule

ADAPTER_NAME = "lorahub"


def linear(weights: torch.Tensor, stacked: torch.Tensor, out: torch.Tensor,
           subset: Sequence[int] | None = None) -> torch.Tensor:
    """The reference rule: every LoRA tensor (A and B alike) is the weighted sum of the modules' tensors.

    With ``subset`` (rows of ``stacked``), ``weights`` belong to those modules alone and the others
    count 0: the sum reads their rows only, one pass each, instead of the whole hub."""
    if subset is None:
        return torch.mv(stacked.T, weights, out=out)
    torch.mul(stacked[subset[0]], weights[0], out=out)
    for row, w in zip(subset[1:], weights[1:].tolist()):
        out.add_(stacked[row], alpha=w)
    return out


# a merge method: (weights, stacked [K, n], out [n], subset of rows or None) -> out
MERGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {"linear": linear}


def lora_config(module: LoraModule, *, base_model_name_or_path: str | None = None):
    """The PEFT ``LoraConfig`` of a module, for inference (no dropout)."""
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in module.config.items() if k in known and k not in ("peft_type", "revision")}
    kwargs["inference_mode"] = True
    kwargs["lora_dropout"] = 0.0
    if base_model_name_or_path is not None:
        kwargs["base_model_name_or_path"] = base_model_name_or_path
    return LoraConfig(**kwargs)


def _lean_lora_forward(layer, batch: "_Candidates", a_offset: int, b_offset: int) -> Callable:
    """A forward for one PEFT LoRA ``Linear`` in the one case a search runs: no gradients, the composed
    adapter alone active and unmerged, no extra arguments, a plain ``nn.Linear`` base layer. It calls
    ``F.linear`` on the base weights and adds the low-rank update in place with one ``addmm_``
    (``result += scaling · (x Aᵀ) Bᵀ``), instead of PEFT's separate multiply and out-of-place add,
    which cost about as much as the low-rank matmuls themselves on CPU; the tensors are looked up
    once, not on every call. Any other case takes PEFT's own forward.

    While ``batch.count`` > 1 (see :meth:`LoraComposer.candidates`), the rows of ``x`` are that many
    candidates' copies of the examples, candidate-major, and candidate ``i`` gets the LoRA composed
    in row ``i`` of ``batch.rows``: the base matmul runs once for all, the low-rank update once per
    candidate with the operations of the single case.
    """
    peft_forward = types.MethodType(type(layer).forward, layer)
    base = layer.base_layer
    a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight  # views of the composer's buffer
    a_t, b_t = a.T, b.T  # views too: they follow every compose
    a_size, b_size = a.numel(), b.numel()
    linear, grad_enabled = torch.nn.functional.linear, torch.is_grad_enabled

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (args or kwargs or grad_enabled() or layer.disable_adapters or layer.merged_adapters
                or layer.active_adapters != [ADAPTER_NAME] or x.dtype != a.dtype):
            return peft_forward(x, *args, **kwargs)
        result = linear(x, base.weight, base.bias)
        scaling = layer.scaling[ADAPTER_NAME]
        if batch.count <= 1:
            result.view(-1, result.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ a_t, b_t, alpha=scaling)
            return result
        xs, outs = x.reshape(batch.count, -1, x.shape[-1]), result.view(batch.count, -1, result.shape[-1])
        for i in range(batch.count):
            row = batch.rows[i]
            a_i = row[a_offset : a_offset + a_size].view(a.shape)
            b_i = row[b_offset : b_offset + b_size].view(b.shape)
            outs[i].addmm_(xs[i] @ a_i.T, b_i.T, alpha=scaling)
        return result

    return forward


class _Candidates:
    """How many candidates the current forward pass holds, and the rows of their composed LoRAs."""

    def __init__(self):
        self.count = 0
        self.rows: torch.Tensor | None = None


class LoraComposer:
    """Holds a base model wrapped with one LoRA slot and the K modules stacked, and writes
    ``compose(weights)`` into that slot in place.

    ``model`` must already be on its final device and dtype; it is wrapped in place.
    """

    def __init__(self, model, modules: Sequence[LoraModule], *, merge_method: str = "linear"):
        from peft import get_peft_model

        if merge_method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {merge_method!r}; choose from {sorted(MERGE_METHODS)}")
        self.modules = list(modules)
        self.merge_method = merge_method
        self._merge = MERGE_METHODS[merge_method]
        config = lora_config(self.modules[0], base_model_name_or_path=getattr(model, "name_or_path", None))
        self.peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
        self.peft_model.eval()
        self._bind()

    def _bind(self) -> None:
        """Stack the modules' tensors as ``[K, n]`` and make the LoRA parameters views of one buffer."""
        marker = f".{ADAPTER_NAME}."
        params = {
            name.replace(marker, "."): p
            for name, p in self.peft_model.named_parameters()
            if marker in name and (".lora_A." in name or ".lora_B." in name)
        }
        first = self.modules[0]
        keys = list(first.state_dict)
        for key in keys:
            if key not in params:
                raise IncompatibleModulesError(
                    f"module '{first.name}' has tensor '{key}' that matches no LoRA layer of the base model"
                )
            if tuple(params[key].shape) != tuple(first.state_dict[key].shape):
                raise IncompatibleModulesError(
                    f"module '{first.name}' has {key} of shape {tuple(first.state_dict[key].shape)} "
                    f"but the base model needs {tuple(params[key].shape)}"
                )
        unmatched = sorted(set(params) - set(keys))
        if unmatched:
            raise IncompatibleModulesError(f"module '{first.name}' lacks tensor '{unmatched[0]}' for the base model")
        # PEFT keeps adapters in float32 even on half-precision models: follow the LoRA parameters
        self.device, self.dtype = params[keys[0]].device, params[keys[0]].dtype
        sizes = [first.state_dict[k].numel() for k in keys]
        total = sum(sizes)
        self.stacked = torch.empty(len(self.modules), total, dtype=self.dtype, device=self.device)
        for i, module in enumerate(self.modules):
            torch.cat([module.state_dict[k].reshape(-1).to(self.dtype) for k in keys], out=self.stacked[i])
            if module.state_dict[keys[0]].dtype == self.dtype and module.state_dict[keys[0]].device == self.device:
                # the module's tensors become views of its row: same values, stored once
                offset = 0
                for key, size in zip(keys, sizes):
                    module.state_dict[key] = self.stacked[i, offset : offset + size].view(module.state_dict[key].shape)
                    offset += size
        self.buffer = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.offsets, offset = {}, 0
        for key, size in zip(keys, sizes):
            p = params[key]
            p.requires_grad_(False)
            p.data = self.buffer[offset : offset + size].view(p.shape)
            self.offsets[id(p)] = offset
            offset += size
        self.keys = keys
        self._batch = _Candidates()
        self._install_lean_forward()

    def _install_lean_forward(self) -> None:
        """Give every LoRA ``Linear`` of the slot a leaner forward for inference (see :func:`_lean_lora_forward`)."""
        from peft.tuners.lora.layer import Linear

        for layer in self.peft_model.modules():
            if (type(layer) is Linear and type(layer.base_layer) is torch.nn.Linear and ADAPTER_NAME in layer.lora_A
                    and ADAPTER_NAME not in layer.lora_variant):
                a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
                layer.forward = _lean_lora_forward(layer, self._batch, self.offsets[id(a)], self.offsets[id(b)])

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    @property
    def model(self):
        """The wrapped model, whose forward uses the composed LoRA."""
        return self.peft_model

    def _weights(self, weights: Sequence[float], modules: Sequence[int] | None = None):
        """``weights`` checked, as the merge method takes them: a tensor and the subset of rows it
        covers (``None``: all of them). A subset of at most half of the modules is summed from its
        own rows (a search over 20 of 196 modules then reads about a tenth of the hub per step);
        a larger one is given zeros for the other modules and summed like the whole hub."""
        w = torch.as_tensor(list(map(float, weights)), dtype=self.dtype, device=self.device)
        if modules is None:
            if w.shape != (self.num_modules,):
                raise ValueError(f"expected {self.num_modules} weights, got {w.numel()}")
            return w, None
        subset = [int(i) for i in modules]
        if not subset or len(set(subset)) != len(subset) or not all(0 <= i < self.num_modules for i in subset):
            raise ValueError(f"modules must be distinct module indices below {self.num_modules}, got {subset}")
        if w.shape != (len(subset),):
            raise ValueError(f"expected {len(subset)} weights, one per module of the subset, got {w.numel()}")
        if 2 * len(subset) <= self.num_modules:
            return w, subset
        full = torch.zeros(self.num_modules, dtype=self.dtype, device=self.device)
        full[subset] = w
        return full, None

    def compose(self, weights: Sequence[float], modules: Sequence[int] | None = None) -> None:
        """Write the composition of the modules with ``weights`` into the model's LoRA slot.

        With ``modules`` (indices), ``weights`` belong to those modules and the others get weight 0:
        the composition of that subset alone."""
        w, subset = self._weights(weights, modules)
        self._merge(w, self.stacked, self.buffer, subset)

    @contextlib.contextmanager
    def candidates(self, weights: Sequence[Sequence[float]], modules: Sequence[int] | None = None):
        """Compose several weight vectors at once, one per candidate; inside the ``with`` block a
        forward pass whose rows are the candidates' copies of the examples, candidate-major (each
        copy the same size), gives each candidate its own composed LoRA. A candidate's composition
        is computed exactly as :meth:`compose` computes it (``modules`` as there). Yields the number
        of candidates."""
        rows = [self._weights(w, modules) for w in weights]
        if not rows:
            raise ValueError("no candidates")
        if len(rows) == 1:
            w, subset = rows[0]
            self._merge(w, self.stacked, self.buffer, subset)
            yield 1
            return
        if self._batch.rows is None or self._batch.rows.shape[0] < len(rows):
            self._batch.rows = torch.empty(len(rows), self.buffer.numel(), dtype=self.dtype, device=self.device)
        for i, (w, subset) in enumerate(rows):  # each as compose computes it: the same values
            self._merge(w, self.stacked, self._batch.rows[i], subset)
        self._batch.count = len(rows)
        try:
            yield len(rows)
        finally:
            self._batch.count = 0

    @contextlib.contextmanager
    def restrict(self, modules: Sequence[int]):
        """Inside the ``with`` block the composer holds only the modules at ``modules`` (hub indices, in
        that order), as if it had been built from them alone: weights are one per module of the subset,
        and every composition is computed exactly as such a composer computes it (the subset's rows are
        copied once into a stack of their own). A search over a preselected subset then follows the
        very path of a search given those modules directly."""
        subset = [int(i) for i in modules]
        if not subset or len(set(subset)) != len(subset) or not all(0 <= i < self.num_modules for i in subset):
            raise ValueError(f"modules must be distinct module indices below {self.num_modules}, got {subset}")
        saved = self.stacked, self.modules
        self.stacked, self.modules = self.stacked[subset], [self.modules[i] for i in subset]
        try:
            yield self
        finally:
            self.stacked, self.modules = saved

    def merge_and_unload(self, weights: Sequence[float]):
        """Compose with ``weights``, merge into the base weights and return the plain base model.

        The composer is spent afterwards: the returned model no longer has a LoRA slot.
        """
        self.compose(weights)
        merged = self.peft_model.merge_and_unload()
        self.peft_model = None
        return merged

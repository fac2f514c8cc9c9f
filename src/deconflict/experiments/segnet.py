"""Dense-prediction models for NYUv2: a multi-task SegNet and MTAN, both ``MultiTaskModel``s.

SegNet (Badrinarayanan et al., TPAMI 2017), as in the MTAN code: ``len(filters)`` encoder
stages, each a 3x3 conv + batch norm + ReLU block from the previous width to ``filters[s]``
followed by one more block (stages 0-1) or two (later stages), then 2x2 max pooling that keeps
its indices; the decoder mirrors it, max-unpooling with those indices. Default widths
64, 128, 256, 512, 512 (VGG-16's). Conv weights are Xavier-normal, biases zero.

- ``SegNet``: the shared encoder-decoder (``shared``) and one small head per task - a 3x3 conv
  then a 1x1 conv to the task's channels - on the final decoder features, which are the shared
  representation. This is the "split" multi-task SegNet of the MTAN code, the GradOPS setting
  (Zhu et al., WSDM 2025, Section 4.2).
- ``MTAN`` (Liu, Johns & Davison, CVPR 2019): the same shared network plus, per task, a
  soft-attention network. At encoder stage s the task's mask a = sigmoid(BN(1x1 conv(ReLU(BN(1x1
  conv(u)))))) is computed from u = [first block output of the stage, the task's features from
  stage s-1] and multiplies the stage output; the product goes through a 3x3 conv block and 2x2
  max pooling to the next stage. The decoder does the same, upsampling bilinearly. The 3x3 conv
  blocks of the attention branches are shared by the tasks (they are in ``shared``, as in the
  CAGrad code); the masks and the heads are task-specific. ``forward`` returns the final shared
  decoder features as the representation, but the tasks read the shared network at every
  stage and through the shared attention blocks, so no single tensor separates the shared
  parameters from the task-specific ones: representation mode does not apply to MTAN.

Recon (``recon.branch``): SegNet's trunk is traced whole, so any of its layers can be branched;
MTAN's shared layers are interleaved with the task attention, so ``MTAN.branch`` traces the
whole body (trunk, shared attention blocks and masks, an ``recon.branch.TaskTrunk`` whose
masks are task-specific) and splits the chosen shared layers there; each task's stream
computes only that task's attention path.

Outputs: ``segmentation`` logits B x classes x H x W, ``depth`` B x 1 x H x W, ``normal`` B x 3 x
H x W with unit length at every pixel. Inputs need H and W of at least 2^len(filters); sizes
that are not multiples of that power work too (unpooling restores each stage's exact size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional

from ..errors import InvalidOptionError, ShapeError
from ..recon.branch import BranchedModule, TaskTrunk, branch
from .multitask import MultiTaskModel

DEFAULT_FILTERS = (64, 128, 256, 512, 512)
TASK_CHANNELS = {"depth": 1, "normal": 3}


def conv_block(inputs: int, outputs: int) -> nn.Sequential:
    """3x3 convolution (same size), batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs),
                         nn.ReLU())


def _repeat(channels: int, stage: int) -> nn.Sequential:
    # VGG-16's pattern: two convolutions in the first two stages, three in the later ones.
    return nn.Sequential(*(conv_block(channels, channels) for _ in range(1 if stage < 2 else 2)))


def prediction_head(channels: int, outputs: int) -> nn.Sequential:
    """3x3 conv then 1x1 conv to the task's channels (no activation, as in the MTAN code)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                         nn.Conv2d(channels, outputs, 1))


def attention_mask(inputs: int, outputs: int) -> nn.Sequential:
    """MTAN's soft mask: two 1x1 conv + batch norm layers, ReLU between, sigmoid at the end."""
    return nn.Sequential(nn.Conv2d(inputs, outputs, 1), nn.BatchNorm2d(outputs), nn.ReLU(),
                         nn.Conv2d(outputs, outputs, 1), nn.BatchNorm2d(outputs), nn.Sigmoid())


def _check_filters(filters: Sequence[int]) -> tuple[int, ...]:
    filters = tuple(int(f) for f in filters)
    if not filters or any(f < 1 for f in filters):
        raise InvalidOptionError(f"filters must be one or more positive widths, got {filters}")
    return filters


def _task_channels(tasks: Sequence[str], classes: int) -> dict[str, int]:
    channels = {"segmentation": classes, **TASK_CHANNELS}
    unknown = [task for task in tasks if task not in channels]
    if unknown or not tasks:
        raise InvalidOptionError(f"dense-prediction tasks are {', '.join(channels)}; got "
                                 f"{list(tasks)}")
    return {task: channels[task] for task in tasks}


@torch.fx.wrap
def check_input_size(x: Tensor, depth: int) -> None:
    """Refuse inputs that ``depth`` stages of 2x2 pooling cannot take. A leaf of ``torch.fx``
    traces (a call in the graph, not traced through), so the trunk stays traceable for Recon."""
    if x.ndim != 4 or min(x.shape[-2:]) < 2 ** depth:
        raise ShapeError(f"SegNet with {depth} stages needs B x C x H x W inputs with H, W "
                         f">= {2 ** depth}, got {tuple(x.shape)}")


def _initialize(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _finish(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    if "normal" in outputs:
        outputs["normal"] = functional.normalize(outputs["normal"], dim=1)
    return outputs


@dataclass
class SegNetFeatures:
    """Intermediate tensors of the shared network, per stage (encoder, by stage index) and per
    decoding step (decoder, from the deepest stage up)."""

    encoder_first: list[Tensor]  # stage s after its first conv block
    encoder: list[Tensor]  # stage s output, before pooling
    upsampled: list[Tensor]  # decoding step i input after max-unpooling
    decoder: list[Tensor]  # decoding step i output; decoder[-1] is the final feature map


class SegNetTrunk(nn.Module):
    """The shared SegNet encoder-decoder; ``forward`` returns every tensor MTAN taps."""

    def __init__(self, filters: Sequence[int] = DEFAULT_FILTERS, in_channels: int = 3) -> None:
        super().__init__()
        self.filters = _check_filters(filters)
        widths = (in_channels, *self.filters)
        self.encoder_first = nn.ModuleList(conv_block(widths[s], widths[s + 1])
                                           for s in range(len(self.filters)))
        self.encoder_rest = nn.ModuleList(_repeat(f, s) for s, f in enumerate(self.filters))
        # Decoder stage s maps filters[s] back to filters[s - 1] (stage 0 stays at filters[0]).
        self.decoder_first = nn.ModuleList(conv_block(f, self.filters[max(s - 1, 0)])
                                           for s, f in enumerate(self.filters))
        self.decoder_rest = nn.ModuleList(_repeat(self.filters[max(s - 1, 0)], s)
                                          for s in range(len(self.filters)))

    def forward(self, x: Tensor) -> SegNetFeatures:
        depth = len(self.filters)
        check_input_size(x, depth)
        features = SegNetFeatures([], [], [], [])
        indices = []
        h = x
        for s in range(depth):
            first = self.encoder_first[s](h)
            out = self.encoder_rest[s](first)
            features.encoder_first.append(first)
            features.encoder.append(out)
            h, index = functional.max_pool2d(out, 2, 2, return_indices=True)
            indices.append(index)
        for i in range(depth):
            s = depth - 1 - i
            up = functional.max_unpool2d(h, indices[s], (2, 2), (2, 2),
                                         output_size=features.encoder[s].shape[-2:])
            h = self.decoder_rest[s](self.decoder_first[s](up))
            features.upsampled.append(up)
            features.decoder.append(h)
        return features


class SegNet(MultiTaskModel):
    """Multi-task SegNet: shared encoder-decoder, a small head per task (see the module doc).
    Recon may branch any layer of the trunk (``shared``).

    >>> import torch
    >>> model = SegNet(["depth", "normal"], filters=[4, 8])
    >>> z, out = model(torch.randn(1, 3, 16, 16))
    >>> tuple(z.shape), tuple(out["normal"].shape)
    ((1, 4, 16, 16), (1, 3, 16, 16))
    """

    supports_branching = True

    def __init__(self, tasks: Sequence[str], filters: Sequence[int] = DEFAULT_FILTERS,
                 classes: int = 13) -> None:
        super().__init__()
        self.shared = SegNetTrunk(filters)
        width = self.shared.filters[0]
        self.heads = nn.ModuleDict({task: prediction_head(width, n)
                                    for task, n in _task_channels(tasks, classes).items()})
        _initialize(self)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.shared(x)
        streams = [f.decoder[-1] for f in self.task_streams(features, len(self.heads))]
        # Branched by Recon, the representation is one final feature map per task's stream.
        z: Any = tuple(streams) if isinstance(self.shared, BranchedModule) else streams[0]
        return z, _finish({task: head(h) for (task, head), h in zip(self.heads.items(), streams,
                                                                    strict=True)})


class MTANShared(nn.Module):
    """MTAN's shared parameters: the SegNet trunk and the attention branches' conv blocks."""

    def __init__(self, filters: Sequence[int]) -> None:
        super().__init__()
        self.trunk = SegNetTrunk(filters)
        f = self.trunk.filters
        last = len(f) - 1
        # Encoder stage s hands the task's features to stage s + 1 (the last keeps its width).
        self.encoder_blocks = nn.ModuleList(conv_block(f[s], f[min(s + 1, last)])
                                            for s in range(len(f)))
        self.decoder_blocks = nn.ModuleList(conv_block(f[s], f[max(s - 1, 0)])
                                            for s in range(len(f)))


class TaskAttention(nn.Module):
    """One task's attention masks, per encoder and decoder stage."""

    def __init__(self, filters: Sequence[int]) -> None:
        super().__init__()
        f = filters
        self.encoder = nn.ModuleList(attention_mask(f[0] if s == 0 else 2 * f[s], f[s])
                                     for s in range(len(f)))
        self.decoder = nn.ModuleList(attention_mask(f[s] + f[max(s - 1, 0)], f[max(s - 1, 0)])
                                     for s in range(len(f)))


class MTANBody(TaskTrunk):
    """MTAN without its heads, for Recon: the shared SegNet trunk and attention blocks and each
    task's masks (``task_specific``); returns each task's final attended features, in the
    order of ``attention``. Built by ``MTAN.branch`` around the model's own modules."""

    def __init__(self, shared: MTANShared, attention: nn.ModuleDict) -> None:
        super().__init__()
        # The shared modules at the top level, so that their names are those of MTAN.shared's
        # parameters (the names Recon scores and branches).
        self.trunk = shared.trunk
        self.encoder_blocks = shared.encoder_blocks
        self.decoder_blocks = shared.decoder_blocks
        self.attention = attention
        self.task_specific = ("attention",)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return _attend(self.trunk(x), self.encoder_blocks, self.decoder_blocks, self.attention)


def _attend(features: SegNetFeatures, encoder_blocks: nn.ModuleList,
            decoder_blocks: nn.ModuleList, attention: nn.ModuleDict) -> tuple[Tensor, ...]:
    """Each task's final attended features (MTAN's attention networks, the module docstring)."""
    depth = len(encoder_blocks)
    attended = []
    for module in attention.values():
        masks = cast(TaskAttention, module)  # ModuleDict is untyped; built in MTAN.__init__
        a = features.encoder_first[0]
        for s in range(depth):
            tap = (features.encoder_first[s] if s == 0
                   else torch.cat((features.encoder_first[s], a), dim=1))
            masked = masks.encoder[s](tap) * features.encoder[s]
            a = functional.max_pool2d(encoder_blocks[s](masked), 2, 2)
        for i in range(depth):
            s = depth - 1 - i
            up = features.upsampled[i]
            a = functional.interpolate(a, size=up.shape[-2:], mode="bilinear",
                                       align_corners=True)
            a = decoder_blocks[s](a)
            a = masks.decoder[s](torch.cat((up, a), dim=1)) * features.decoder[i]
        attended.append(a)
    return tuple(attended)


class MTAN(MultiTaskModel):
    """Multi-task attention network over SegNet (see the module docstring).

    ``branch(layers, num_tasks)`` (Recon) makes layers of ``shared`` task-specific: the body is
    then one ``recon.BranchedModule`` in ``shared`` (its shared parameters: the still-shared
    trunk and blocks; the masks move into it, and ``attention`` is removed).

    >>> import torch
    >>> model = MTAN(["depth", "normal"], filters=[4, 8])
    >>> model.branch(["trunk.decoder_first.1"], 2)
    >>> _, out = model(torch.randn(1, 3, 16, 16))
    >>> tuple(out["depth"].shape), hasattr(model, "attention")
    ((1, 1, 16, 16), False)
    """

    shared: MTANShared | BranchedModule
    attention: nn.ModuleDict

    def __init__(self, tasks: Sequence[str], filters: Sequence[int] = DEFAULT_FILTERS,
                 classes: int = 13) -> None:
        super().__init__()
        self.shared = MTANShared(filters)
        f = self.shared.trunk.filters
        channels = _task_channels(tasks, classes)
        self.attention = nn.ModuleDict({task: TaskAttention(f) for task in channels})
        self.heads = nn.ModuleDict({task: prediction_head(f[0], n)
                                    for task, n in channels.items()})
        _initialize(self)

    def branch(self, layers: Sequence[str], num_tasks: int) -> None:
        """Recon: replace the shared ``layers`` (names as in ``shared``, e.g.
        ``trunk.encoder_first.2`` or ``encoder_blocks.1``) by one re-initialized copy per task.
        """
        if isinstance(self.shared, BranchedModule):
            raise InvalidOptionError("this MTAN is branched already")
        if num_tasks != len(self.heads):
            raise InvalidOptionError(f"MTAN has {len(self.heads)} tasks, not {num_tasks}")
        body = MTANBody(self.shared, self.attention)
        branched = branch(body, layers, num_tasks)
        branched.reset_branches()
        del self.attention  # the masks live on in the branched body (task-specific there)
        self.shared = branched

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(self.shared, BranchedModule):
            attended = self.shared(x)
            z = attended[0]  # no shared representation (see the module docstring)
        else:
            features = self.shared.trunk(x)
            attended = _attend(features, self.shared.encoder_blocks, self.shared.decoder_blocks,
                               self.attention)
            z = features.decoder[-1]
        outputs = {task: head(a) for (task, head), a in zip(self.heads.items(), attended,
                                                            strict=True)}
        return z, _finish(outputs)

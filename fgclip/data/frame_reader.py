"""Decode only what a video's frame selection needs, with the frames a full decode gives.

A training video needs 16 of its thousands of frames and a test video one in 16, yet
decoding every frame was the stage's whole cost. When one pass over the container's
packets (demuxing only, no decoding: about 40 ms for 3,600 frames of 320×240 here) proves the video can be
addressed exactly, the reader decodes only:

- from the IDR frame before each wanted frame forward to it (a *run*), seeking
  between runs when the packets in between cost more to decode than a seek;
- within a run, every packet except the non-reference pictures (H.264
  ``nal_ref_idc == 0``) that are not wanted themselves: no other picture is predicted
  from them, so the pictures that are decoded come out bit for bit as in a full
  decode. x264's default B-pyramid makes about half the pictures non-reference.

Frame ``k`` is the packet with the ``k``-th smallest timestamp, which is the ``k``-th
frame a full decode outputs when the table is exact. It is exact (else
:func:`scan_packets` says why, and the caller decodes every frame) for H.264 in MP4/MOV
whose packets all carry timestamps (presentation times unique, decode times
increasing, and reordered when the stream reorders pictures), none flagged corrupt or
discarded (a cut file, an edit list), as many as the container declares, the first an
IDR frame. Seeks go only to IDR frames: after an
open-GOP I frame, pictures can still refer to the frames before it. While reading, a
frame that is not the one the table predicts (a decoder that drops or reorders
otherwise) raises :class:`NotExact`, and the caller starts over with a full decode.

A frame the decoder flags corrupt (damage it concealed, from whatever it had decoded
before) raises :class:`NotExact` too. What a full decode finds and this reader cannot:
damage inside the payload of a packet it never decodes (a full decode reports it as
``corrupt:``, or ``truncated:`` when the decoder just drops the frame). ``frames.decode: all`` decodes
every frame for that check.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import av
import numpy as np

# Decoding a packet costs about one unit; a seek (demuxer index lookup, decoder flush,
# refilling its reorder delay) about this many. Runs closer than this are joined.
SEEK_COST = 4.0
# The reader's plan must beat one run from the first frame by this factor to seek at all:
# the estimate counts packets, not their sizes.
SPARSE_MARGIN = 0.9

_H264_SLICE_TYPES = range(1, 6)  # coded slice NAL units (5: IDR)
_H264_IDR = 5


class NotExact(RuntimeError):
    """The decoder gave other frames than the packet table predicts."""


@dataclass(frozen=True)
class PacketTable:
    """The video stream's packets in decode order, as demuxing (not decoding) found them."""

    pts: np.ndarray  # int64, presentation timestamps
    dts: np.ndarray  # int64, decode timestamps (checked after each seek)
    idr: np.ndarray  # bool: the packet is an IDR frame (a point decoding can start from)
    disposable: np.ndarray  # bool: a non-reference picture (no other frame depends on it)

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    def frame_numbers(self) -> np.ndarray:
        """Each packet's frame number (display order), in decode order."""
        order = np.argsort(self.pts, kind="stable")
        numbers = np.empty(len(order), np.int64)
        numbers[order] = np.arange(len(order))
        return numbers


@dataclass(frozen=True)
class Run:
    """Decode packets ``first..last`` (decode order), ``first`` an IDR frame."""

    first: int
    last: int


def _nal_units(data: memoryview, length_size: int) -> Iterator[int]:
    """The header byte of each NAL unit of an MP4 (length-prefixed, ``avcC``) H.264 packet."""
    i = 0
    while i + length_size < len(data):
        size = int.from_bytes(data[i : i + length_size], "big")
        yield data[i + length_size]
        i += length_size + size


def _h264_kind(data: memoryview, length_size: int) -> tuple[bool, bool]:
    """(IDR, non-reference) of one packet; a packet without slices is neither."""
    slices = [h for h in _nal_units(data, length_size) if (h & 0x1F) in _H264_SLICE_TYPES]
    if not slices:
        return False, False
    idr = all(h & 0x1F == _H264_IDR for h in slices)
    return idr, all((h >> 5) & 0x3 == 0 for h in slices)


def scan_packets(
    container: av.container.InputContainer, stream: av.VideoStream
) -> tuple[PacketTable | None, str]:
    """Demux every packet of ``stream`` (nothing decoded): the table, or ``None`` and why not.

    Leaves the container at its end: the caller seeks before decoding.
    """
    if "mp4" not in container.format.name.split(","):
        return None, f"container {container.format.name!r} (only MP4/MOV is addressed exactly)"
    if stream.codec_context.name != "h264":
        return None, f"codec {stream.codec_context.name!r} (only H.264 is addressed exactly)"
    extradata = stream.codec_context.extradata or b""
    if len(extradata) < 7 or extradata[0] != 1:
        return None, "no avcC configuration (H.264 not in MP4's length-prefixed form)"
    length_size = (extradata[4] & 0x3) + 1
    declared = stream.frames
    if declared <= 0:
        return None, "the container declares no frame count"
    pts, dts, idr, disposable = [], [], [], []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        if packet.pts is None or packet.dts is None:
            return None, f"packet {len(pts)} has no timestamp"
        if packet.is_corrupt or packet.is_discard:
            return None, f"packet {len(pts)} is flagged {'corrupt' if packet.is_corrupt else 'discarded'}"
        is_idr, is_disposable = _h264_kind(memoryview(packet), length_size)
        pts.append(packet.pts)
        dts.append(packet.dts)
        idr.append(is_idr and packet.is_keyframe)
        disposable.append(is_disposable)
    if len(pts) != declared:
        return None, f"{len(pts)} packets, the container declares {declared} frames"
    table = PacketTable(
        np.asarray(pts, np.int64),
        np.asarray(dts, np.int64),
        np.asarray(idr, bool),
        np.asarray(disposable, bool),
    )
    if not table.idr[0]:
        return None, "the first packet is not an IDR frame"
    if len(np.unique(table.pts)) != len(pts):
        return None, "presentation timestamps repeat"
    if np.any(np.diff(table.dts) <= 0):
        return None, "decode timestamps do not increase"
    if stream.codec_context.has_b_frames and np.all(np.diff(table.pts) > 0):
        # The stream reorders pictures but the container's times are in decode order (a muxer
        # that wrote no composition offsets): its times do not say which frame is which.
        return None, "the stream reorders frames, its presentation timestamps do not"
    return table, ""


def plan_runs(table: PacketTable, wanted: Iterable[int]) -> list[Run]:
    """The runs that decode ``wanted`` (frame numbers) at the least estimated cost.

    Each wanted frame needs the packets from the IDR frame before it (in decode order)
    to its own packet. Neighbouring runs are joined when the packets between them cost
    less than a seek; the whole plan falls back to one run from the first packet when
    seeking would not save ``1 - SPARSE_MARGIN`` of it.
    """
    numbers = table.frame_numbers()
    packet_of = np.empty(len(numbers), np.int64)
    packet_of[numbers] = np.arange(len(numbers))
    wanted = sorted(set(wanted))
    targets = np.unique(packet_of[np.asarray(wanted, np.int64)]) if wanted else np.empty(0, np.int64)
    if len(targets) == 0:
        return []
    idr_packets = np.flatnonzero(table.idr)
    starts = idr_packets[np.searchsorted(idr_packets, targets, side="right") - 1]
    wanted_packet = np.zeros(len(numbers), bool)
    wanted_packet[targets] = True
    cost_each = np.where(table.disposable & ~wanted_packet, 0.0, 1.0)
    cumulative = np.concatenate([[0.0], np.cumsum(cost_each)])

    def cost(first: int, last: int) -> float:  # decoding packets first..last
        return float(cumulative[last + 1] - cumulative[first])

    runs: list[Run] = []
    for start, target in zip(starts.tolist(), targets.tolist()):
        if runs and (start <= runs[-1].last or cost(runs[-1].last + 1, start - 1) <= SEEK_COST):
            runs[-1] = Run(runs[-1].first, max(runs[-1].last, target))
        else:
            runs.append(Run(start, target))
    one_run = cost(0, runs[-1].last)
    seeking = sum(cost(r.first, r.last) for r in runs) + SEEK_COST * (len(runs) - 1)
    if runs[0].first != 0:
        seeking += SEEK_COST
    return runs if seeking < SPARSE_MARGIN * one_run else [Run(0, runs[-1].last)]


def read_frames(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    table: PacketTable,
    runs: list[Run],
    wanted: set[int],
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Decode ``runs`` and yield ``(frame number, frame)`` for each wanted frame, in order.

    Raises :class:`NotExact` when the decoder's frames are not the ones the table predicts.
    """
    numbers = table.frame_numbers()
    number_of_pts = dict(zip(table.pts.tolist(), numbers.tolist()))
    wanted_packet = np.isin(numbers, np.fromiter(wanted, np.int64, len(wanted)))
    for run in runs:
        yield from _read_run(container, stream, table, run, numbers, number_of_pts, wanted_packet, wanted)


def _read_run(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    table: PacketTable,
    run: Run,
    numbers: np.ndarray,
    number_of_pts: dict[int, int],
    wanted_packet: np.ndarray,
    wanted_numbers: set[int],
) -> Iterator[tuple[int, av.VideoFrame]]:
    span = slice(run.first, run.last + 1)
    decode = ~table.disposable[span] | wanted_packet[span]
    expected = np.sort(numbers[span][decode]).tolist()  # what the run outputs: display order
    codec = stream.codec_context
    # By the IDR frame's presentation time: MP4's seek picks the last keyframe whose
    # presentation time is at or before it (by its decode time it lands one IDR early).
    # Seeking flushes the decoder (PyAV flushes every stream's codec context).
    container.seek(int(table.pts[run.first]), stream=stream, backward=True, any_frame=False)
    out = 0

    def frames(packet: av.Packet) -> Iterator[tuple[int, av.VideoFrame]]:
        nonlocal out
        for frame in codec.decode(packet):
            if frame.is_corrupt:
                # Concealed damage: what fills the broken parts depends on the pictures
                # decoded before, which skipping and seeking change.
                raise NotExact(f"the decoder concealed damage in the frame at pts {frame.pts}")
            k = number_of_pts.get(frame.pts)
            if out >= len(expected) or k != expected[out]:
                raise NotExact(
                    f"the decoder gave pts {frame.pts} where the table has frame {expected[out : out + 1]}"
                )
            out += 1
            if k in wanted_numbers:
                yield k, frame

    i = run.first
    for packet in container.demux(stream):
        if packet.size == 0 or i > run.last:
            break
        if packet.dts != table.dts[i]:
            raise NotExact(f"packet {i} has dts {packet.dts}, the table {table.dts[i]}")
        if decode[i - run.first]:
            yield from frames(packet)
        i += 1
    if i <= run.last:
        raise NotExact(f"demuxing ended at packet {i}, the run needs up to {run.last}")
    # Drain the frames the decoder still holds with an empty packet that carries the stream's
    # time base (PyAV dates a frame by the packet it came from; ``None`` would leave it undated).
    drain = av.Packet()
    drain.time_base = stream.time_base
    yield from frames(drain)
    if out != len(expected):
        raise NotExact(f"the decoder gave {out} of the {len(expected)} frames the table predicts")

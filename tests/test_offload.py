"""Memory plans: expert and block offload give bit-identical latents; the automatic choice per memory tier.

On the CPU the device and the host are the same memory, but the store still packs every block into a
host buffer, copies it into a fresh device buffer before use and releases it after: the same code
path as on a GPU, without the side stream and page-locking (those are checked by the CUDA tests).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bernini import offload
from bernini.cases import Case, load_case_file
from bernini.config import GenerationSettings, RuntimeConfig
from bernini.offload import ExpertStore, GiB, plan_memory, reference_workload
from bernini.offload import sizes as memory
from bernini.pipeline import Renderer
from bernini.testing import tiny_checkpoints

REPO = Path(__file__).resolve().parent.parent
CASE = REPO / "assets" / "testcases" / "v2v" / "v2v_case1.json"
SMALL = GenerationSettings(num_inference_steps=4, max_image_size=64, num_frames=5)
A14B_EXPERT = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40, "in_channels": 16, "out_channels": 16,
               "text_dim": 4096, "freq_dim": 256, "patch_size": (1, 2, 2)}
UMT5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_layers": 24, "num_heads": 64, "vocab_size": 256384, "feed_forward_proj": "gated-gelu",
            "relative_attention_num_buckets": 32, "model_type": "umt5"}
HOST = 120 * GiB  # a workstation with plenty of RAM; host-limited cases set their own


@pytest.fixture(scope="module")
def config() -> str:
    return str(tiny_checkpoints().diffusers)


@pytest.fixture(scope="module")
def case() -> Case:
    return load_case_file(CASE)


def load(config: str, **runtime: object) -> Renderer:
    return Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cpu", dtype="float32", attention="sdpa", **runtime))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def resident_latent(config: str, case: Case) -> torch.Tensor:
    out = load(config, offload="none").render(case, SMALL)
    assert out.latent is not None
    return out.latent


# --------------------------------------------------------------------------- lossless offload


@pytest.mark.parametrize("mode", ["expert", "block"])
def test_offload_is_bit_identical(config: str, case: Case, resident_latent: torch.Tensor, mode: str) -> None:
    renderer = load(config, offload=mode)
    first = renderer.render(case, SMALL)
    second = renderer.render(case, SMALL)  # across cases: the first expert is brought back in
    assert torch.equal(first.latent, resident_latent)
    assert torch.equal(second.latent, resident_latent)
    assert renderer.store.offload == mode and renderer.store.copied_bytes > 0
    assert first.info["memory_plan"]["offload"] == mode


def test_expert_plan_keeps_one_expert_on_the_device(config: str, case: Case) -> None:
    renderer = load(config, offload="expert")
    renderer.render(case, SMALL)
    store = renderer.store
    assert store.active == "low"
    assert all(c.on_device for c in store._copies("low")) and not any(c.on_device for c in store._copies("high"))
    weight = renderer.experts["high"].blocks[0].attn1.to_qkv.weight
    assert inside(weight, store.blocks["high"][0].buffer)  # released: the module points at its host copy again
    renderer.store.bring_in("high")
    assert store.active == "high" and not any(c.on_device for c in store._copies("low"))


def test_expert_prefetch_copies_ahead_within_its_room(config: str) -> None:
    renderer = load(config, offload="expert")
    store = renderer.store
    store("high")
    one_block = store.blocks["low"][0].nbytes
    store.prefetch_bytes = store.heads["low"].nbytes + one_block  # type: ignore[union-attr]
    store.prefetch("low")
    assert store.active == "high" and all(c.on_device for c in store._copies("high"))  # nothing evicted
    assert store.heads["low"].on_device and store.blocks["low"][0].on_device  # type: ignore[union-attr]
    assert not store.blocks["low"][1].on_device  # beyond the room: copied at the switch
    store("low")
    assert all(c.on_device for c in store._copies("low")) and not any(c.on_device for c in store._copies("high"))


def inside(tensor: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    return buffer is not None and buffer.data_ptr() <= tensor.data_ptr() < buffer.data_ptr() + buffer.numel()


def test_block_plan_runs_each_block_from_its_fetched_copy(config: str, case: Case, resident_latent: torch.Tensor) -> None:
    renderer = load(config, offload="block")
    store = renderer.store
    seen: list[tuple[bool, int]] = []

    def check(name: str, index: int) -> Callable[[torch.nn.Module, object], None]:
        def hook(module: torch.nn.Module, args: object) -> None:
            copy = store.blocks[name][index]
            fetched = inside(module.attn1.to_qkv.weight, copy.device_buffer) and not inside(module.attn1.to_qkv.weight, copy.buffer)
            seen.append((fetched, sum(c.on_device for c in store.blocks[name])))

        return hook

    for name, model in renderer.experts.items():
        for index in range(len(model.blocks)):  # by index: iterating the blocks would fetch them
            model.blocks[index].register_forward_pre_hook(check(name, index))
    assert torch.equal(renderer.render(case, SMALL).latent, resident_latent)
    assert seen and all(fetched for fetched, _ in seen)
    assert max(n for _, n in seen) <= 2  # block i and block i + 1 in flight
    assert store.most_blocks_on_device <= offload.STREAMED_BLOCKS
    # Embeddings and head stay resident (no copy of them exists on the host).
    assert all(store.heads[name] is None for name in renderer.experts)


def test_plan_is_logged_and_recorded(config: str, case: Case, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bernini.pipeline"):
        renderer = load(config, offload="block")
    assert any("memory plan: block" in r.getMessage() for r in caplog.records)
    info = renderer.render(case, SMALL).info["memory_plan"]
    assert info["offload"] == "block" and info["chosen_by"] == "forced" and "summary" in info and "copied_gib" in info


def test_auto_on_the_cpu_is_none(config: str) -> None:
    renderer = load(config)
    assert renderer.memory_plan is not None and renderer.memory_plan.offload == "none" and renderer.store.offload == "none"


def test_store_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown offload"):
        ExpertStore({}, "disk")


# --------------------------------------------------------------------------- the automatic choice


def a14b_sizes() -> memory.ModelSizes:
    return memory.ModelSizes(
        expert_params=memory.transformer_params(A14B_EXPERT),
        experts=2,
        text_encoder_params=memory.umt5_encoder_params(UMT5_XXL),
        vae_bytes=int(0.508e9),
        dim=5120,
        ffn_dim=13824,
        num_layers=40,
    )


def plan(gpu_gib: float | None, host: float | None = HOST, **kwargs: object) -> offload.MemoryPlan:
    gpu = None if gpu_gib is None else gpu_gib * GiB
    return plan_memory(a14b_sizes(), reference_workload(), dtype="bfloat16", gpu_free=gpu, host_free=host, **kwargs)  # type: ignore[arg-type]


def test_a14b_sizes_are_the_model_card_ones() -> None:
    ws = offload.weight_sizes(a14b_sizes(), "bfloat16")
    assert ws.expert / 1e9 == pytest.approx(28.6, abs=0.1) and ws.text_encoder / 1e9 == pytest.approx(11.4, abs=0.1)
    assert ws.nonblock + 40 * ws.block == pytest.approx(ws.expert)


@pytest.mark.parametrize(("card_gib", "expected"), [(79, "none"), (47, "expert"), (23, "block")])  # free on 80, 48, 24 GB cards
def test_auto_picks_per_tier_at_480p(card_gib: float, expected: str) -> None:
    chosen = plan(card_gib)
    assert chosen.offload == expected and chosen.fits is True and chosen.chosen_by == "auto"
    assert chosen.peak_bytes <= card_gib * GiB
    assert f"memory plan: {expected}" in chosen.describe() and "expected peak" in chosen.describe()


def test_faster_says_what_to_free() -> None:
    assert "free" in plan(47).faster[0] and "--offload none" in plan(47).faster[0]
    block = plan(23)
    assert any("--offload none" in t for t in block.faster) and any("--offload expert" in t for t in block.faster)
    assert any("--weights fp8" in t for t in plan(47).faster)  # two fp8 experts fit a 48 GB card
    assert not any("--offload" in t for t in plan(79).faster)


@pytest.mark.parametrize(("cap", "expected"), [(47, "expert"), (23, "block"), (200, "none")])
def test_max_gpu_memory_caps_the_choice(cap: float, expected: str) -> None:
    chosen = plan(79, max_gpu_memory=cap)
    assert chosen.offload == expected and chosen.gpu_budget == min(cap, 79) * GiB
    if expected != "none":
        assert any("raise --max_gpu_memory" in t for t in chosen.faster)


def test_expert_plan_prefetches_what_fits() -> None:
    tight = plan(47)
    assert 0 < tight.prefetch_bytes < tight.expert_bytes and "prefetched before the switch" in tight.describe()
    roomy = plan(79, offload="expert", t5_cpu=True)
    assert roomy.chosen_by == "forced" and roomy.prefetch_bytes == roomy.expert_bytes and "in full" in roomy.describe()
    assert plan(36, offload="expert").prefetch_bytes == 0  # copied at the switch, said so
    assert "copied at the switch" in plan(36, offload="expert").describe()


def test_text_encoder_and_vae_follow_the_room() -> None:
    # UMT5 leaves the GPU after encoding even on a 141 GB card; CPU encoding only when asked or when nothing else fits
    assert plan(200).text_encoder == "visit" and plan(79).text_encoder == "visit" and plan(79, t5_cpu=True).text_encoder == "cpu"
    assert plan(47).text_encoder == "visit"
    assert not plan(23).vae_tiling and plan(23, vae_tiling=True).vae_tiling


def test_nothing_fits_says_so() -> None:
    assert plan(12).fits and plan(8).fits  # block, chunked activations, CPU text encoding, the u/c passes one at a time
    chosen = plan(5)
    assert chosen.fits is False and chosen.offload == "block"
    assert any("--max_image_size" in t for t in chosen.faster)
    host_short = plan(23, host=40 * GiB)
    assert host_short.fits is False and any("host memory" in t for t in host_short.faster)


def test_unknown_free_memory_keeps_everything_resident() -> None:
    chosen = plan(None, host=None)
    assert chosen.offload == "none" and chosen.fits is None and chosen.prefetch_bytes == 0


def test_fp8_plans_need_about_half() -> None:
    bf16, fp8 = offload.weight_sizes(a14b_sizes(), "bfloat16"), offload.weight_sizes(a14b_sizes(), "bfloat16", "fp8")
    assert 0.5 < fp8.expert / bf16.expert < 0.55
    assert plan(47, weights_format="fp8").offload == "none"


def test_bad_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="--offload"):
        plan(79, offload="disk")
    with pytest.raises(ValueError, match="--weights"):
        plan(79, weights_format="int4")


# --------------------------------------------------------------------------- CUDA only

def test_host_copy_packs_a_tied_tensor_once() -> None:
    module = torch.nn.Module()
    module.a, module.b = torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(4, 8, bias=False)
    module.b.weight = module.a.weight  # tied, like UMT5's shared embedding
    before = module.a.weight.detach().clone()
    copy = offload.host_copy(module, pin=False)
    assert copy.nbytes == offload.ALIGN  # 32 floats, aligned once
    assert module.a.weight is module.b.weight and torch.equal(module.a.weight, before)
    copy.copy_to(torch.device("cpu"))
    assert copy.on_device and module.a.weight.data_ptr() == copy.device_buffer.data_ptr() and torch.equal(module.a.weight, before)
    copy.point_at_host()
    assert module.a.weight.data_ptr() == copy.buffer.data_ptr() and copy.device_buffer is None


def test_text_encoder_visits_and_leaves(config: str) -> None:
    """The visiting encoder, packed in many small chunks, gives the resident one's embeddings and points back at its host copy after."""
    renderer = load(config)
    resident = renderer.encode_text("a red fox", "blurry")
    renderer.text_visit = offload.HostModule(renderer.text_encoder.model, pin=False, chunk_bytes=4096)
    copies = renderer.text_visit.copies
    assert len(copies) > 3  # split, so no single large device block is needed
    visited = renderer.encode_text("a red fox", "blurry")
    assert torch.equal(visited["c"], resident["c"]) and torch.equal(visited["u"], resident["u"])
    assert not renderer.text_visit.on_device
    spans = [(c.buffer.data_ptr(), c.buffer.data_ptr() + c.buffer.numel()) for c in copies]
    assert all(any(lo <= p.data_ptr() < hi for lo, hi in spans) for p in renderer.text_encoder.model.parameters())


def test_host_module_keeps_tied_tensors_in_one_chunk() -> None:
    module = torch.nn.Module()
    module.a, module.mid, module.b = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))
    module.b.weight = module.a.weight  # first and last: far apart in the slot order
    host = offload.HostModule(module, pin=False, chunk_bytes=64 * 64 * 4)
    assert len(host.copies) == 2 and sum(c.nbytes for c in host.copies) == 2 * 64 * 64 * 4
    with host.visit(torch.device("cpu")):
        assert module.a.weight.data_ptr() == module.b.weight.data_ptr() == host.copies[0].device_buffer.data_ptr()
    assert module.a.weight.data_ptr() == host.copies[0].buffer.data_ptr()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (side streams, pinned memory)")


@needs_cuda
def test_cuda_text_encoder_waits_pinned_on_the_host(config: str, case: Case) -> None:
    renderer = Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cuda", dtype="bfloat16", attention="sdpa"))
    assert renderer.text_visit is not None and renderer.text_visit.pinned
    renderer.render(case, SMALL)
    renderer.render(case, SMALL)  # a second visit into the pool the first case left behind
    assert all(p.device.type == "cpu" for p in renderer.text_encoder.model.parameters())


@needs_cuda
@pytest.mark.parametrize("mode", ["expert", "block"])
def test_cuda_offload_is_bit_identical(config: str, case: Case, mode: str) -> None:
    def render(offload_mode: str) -> tuple[torch.Tensor, Renderer]:
        r = Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cuda", dtype="bfloat16", attention="sdpa", offload=offload_mode))
        return r.render(case, SMALL).latent, r

    reference, _ = render("none")
    latent, renderer = render(mode)
    assert torch.equal(latent, reference)
    store = renderer.store
    assert store.stream is not None
    # Registered page-aligned inside a larger allocation: Tensor.is_pinned() looks at the allocation's start, so ask the copy.
    assert all(c.pinned for copies in store.blocks.values() for c in copies)


@needs_cuda
def test_cuda_block_streaming_overlaps_on_a_side_stream(config: str) -> None:
    renderer = Renderer.from_pretrained(config, runtime=RuntimeConfig(device="cuda", dtype="bfloat16", attention="sdpa", offload="block"))
    store = renderer.store
    model = store("high")
    list(model.blocks)  # iterate like a forward: fetch i, prefetch i + 1
    torch.cuda.synchronize()
    assert store.blocks["high"][0].on_device and store.most_blocks_on_device <= offload.STREAMED_BLOCKS
    assert store.blocks["high"][0].device_buffer is not None and store.blocks["high"][0].device_buffer.is_cuda


@needs_cuda
def test_cuda_max_gpu_memory_binds_the_allocator_for_a_plain_cuda_device() -> None:
    from bernini.pipeline import cap_gpu_memory

    cap_gpu_memory(0.5, torch.device("cuda"))  # "cuda" without an index, as --device cuda gives
    try:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(1 * GiB, dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.parametrize("ranks", [1, 4])
def test_ranks_on_one_host_plan_with_their_share_of_host_memory(config: str, ranks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every local rank pins its own copies: each plans with free host RAM / local ranks."""
    monkeypatch.setattr(memory, "host_free_bytes", lambda: 100 * GiB)
    monkeypatch.setattr(memory, "gpu_free_bytes", lambda device: 23 * GiB)
    chosen = offload.plan_for_run(Path(config), 2, RuntimeConfig(device="cuda", host_ranks=ranks), torch.device("cuda"))
    assert chosen.host_free == 100 * GiB / ranks and f"of {100 / ranks:.1f} GiB" in chosen.describe()


V2V_APG_480P = memory.Workload(tokens=2 * 66780, pixels=848 * 480, frames=81, single_tokens=66780)  # source + target, u/c batched


def test_a_24_gb_card_runs_v2v_with_the_guidance_passes_one_at_a_time() -> None:
    """Batched v2v_apg passes (133,560 tokens) fit no plan in 23 GiB; one at a time (66,780, as t2v's batched pair) they do."""
    def v2v(gpu_gib: float, **kwargs: object) -> offload.MemoryPlan:
        return plan_memory(a14b_sizes(), V2V_APG_480P, dtype="bfloat16", gpu_free=gpu_gib * GiB, host_free=HOST, **kwargs)  # type: ignore[arg-type]

    small = v2v(23)
    assert small.fits and small.offload == "block" and not small.batch_passes and small.text_encoder == "visit"
    assert "guidance passes one at a time" in small.describe() and small.to_info()["batch_passes"] is False
    assert any("for batched guidance passes" in tip for tip in small.faster)
    assert small.peak_bytes <= 23 * GiB  # the same tokens per forward as 480p t2v with its pair batched, and the source's kept
    assert v2v(200).batch_passes and v2v(200).offload == "none"  # room: batched, nothing moves
    refused = v2v(23, batch_passes=False)  # --no-batch_passes: never batched, and no tip to batch
    assert not refused.batch_passes and not any("batched" in tip for tip in refused.faster)


def test_the_renderer_follows_the_plans_batching(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = offload.plan_for_run
    monkeypatch.setattr(offload, "plan_for_run", lambda *a, **k: dataclasses.replace(real(*a, **k), batch_passes=False))
    assert load(config).runtime.batch_passes is False

"""GPU-only checks (bench/gpu_check.sh runs them on the lent GPU machine; elsewhere they skip): the pipeline on
CUDA computes what it computes on the CPU, the phrase pass queues no host synchronisation from our code, the
SAM decoder's CUDA graphs replay the eager decoder, and int8 weights load onto the GPU."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from flmm_ros.grounding import GroundingPipeline, PipelineConfig
from flmm_ros.grounding.testing import write_random_bundle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PACKAGE = str(Path(__file__).resolve().parents[1] / "ros_ws" / "src" / "flmm_ros" / "flmm_ros")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(write_random_bundle(tmp_path_factory.mktemp("gpu") / "bundle", layers=3, hidden=64))


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (48, 80, 3), dtype=np.uint8)


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def test_cuda_pipeline_matches_the_cpu_pipeline(bundle):
    results = {}
    for device in ("cpu", "cuda"):
        pipe = GroundingPipeline.from_config(PipelineConfig(model=bundle, device=device, dtype="float32",
                                                            answer=False))
        frame = pipe.encode(image())
        with torch.no_grad():
            maps = pipe.lmm.phrase_pass(frame.lmm, ["the red mug", "the bowl"]).maps.cpu()
        results[device] = maps, pipe.run(frame, "put the red mug in the bowl")
    (maps, cpu), (cuda_maps, gpu) = results["cpu"], results["cuda"]
    assert (cuda_maps - maps).abs().max().item() <= 1e-4
    assert [o.phrase for o in gpu.objects] == [o.phrase for o in cpu.objects]
    assert all(iou(a.mask > 0, b.mask > 0) >= 0.99 for a, b in zip(cpu.objects, gpu.objects))


def test_phrase_pass_queues_no_host_sync_from_our_code(bundle):
    """CUDA's sync debug mode warns at every synchronising call; none may come from flmm_ros itself
    (transformers' own are listed in the message, for information)."""
    pipe = GroundingPipeline.from_config(PipelineConfig(model=bundle, device="cuda", dtype="float16", answer=False))
    frame = pipe.encode(image())
    pipe.lmm.phrase_pass(frame.lmm, ["the red mug"])                 # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pipe.lmm.phrase_pass(frame.lmm, ["the red mug", "the bowl"])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    ours = [s for s in syncs if s.startswith(PACKAGE)]
    assert not ours, f"host syncs in our phrase pass: {ours} (all: {syncs})"


def test_int8_weights_load_onto_the_gpu_and_ground(bundle):
    pytest.importorskip("torchao")
    pipe = GroundingPipeline.from_config(PipelineConfig(model=bundle, device="cuda", dtype="bfloat16",
                                                        quantization="int8", answer=True, max_new_tokens=4))
    weight = pipe.lmm.language_model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.device.type == "cuda"
    result = pipe.run(image(), "pick the red mug")
    assert result.objects and result.objects[0].mask.shape == (48, 80)


def test_sam_decoder_cuda_graphs_replay_the_eager_decoder():
    from flmm_ros.grounding.sam.backends import TorchBackend
    from flmm_ros.grounding.sam.models import TINY_TEST_SAM, build_sam
    torch.manual_seed(0)
    sam = build_sam(TINY_TEST_SAM).eval()
    with torch.no_grad():   # SAM zero-initialises some embeddings; random values exercise every path
        for p in [*sam.prompt_encoder.parameters(), *sam.mask_decoder.parameters()]:
            p.normal_(0, 0.2)
    device = torch.device("cuda")
    graphed, eager = TorchBackend(sam, device, "fp32"), TorchBackend(sam, device, "fp32", cuda_graphs=False)
    embedding = graphed.encode(torch.randn(1, 3, 256, 256))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for count in (1, 3, 8, 3, 1):
            inputs = (embedding, torch.randn(1, 1, 64, 64, generator=g), torch.tensor([[20.0, 30.0, 200.0, 180.0]]),
                      torch.randn(1, count, 32, generator=g))
            for got, expected in zip(graphed.decode(*inputs), eager.decode(*inputs)):
                assert (got - expected).abs().max().item() <= 1e-5
    assert graphed.graphed.disabled_reason is None, graphed.graphed.disabled_reason
    assert (graphed.graphed.captured, graphed.graphed.replays) == (3, 5)
    with torch.enable_grad():                      # training: eager, differentiable
        tokens = torch.randn(1, 2, 32, device=device, requires_grad=True)
        low_res, _ = graphed.decode(embedding, inputs[1], inputs[2], tokens)
        assert low_res.requires_grad and graphed.graphed.replays == 5


def test_sam_encoder_on_cuda_runs_sdpa_with_segment_anythings_embeddings():
    import copy

    from flmm_ros.grounding.sam.backends import TorchBackend
    from flmm_ros.grounding.sam.models import TINY_TEST_SAM, build_sam
    from flmm_ros.grounding.sam.sdpa import SdpaAttention
    torch.manual_seed(0)
    sam = build_sam(TINY_TEST_SAM).eval()
    reference = copy.deepcopy(sam).cuda()
    backend = TorchBackend(sam, torch.device("cuda"), "fp32")
    assert any(isinstance(m, SdpaAttention) for m in sam.image_encoder.modules())
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = reference.image_encoder(image.cuda())
    assert (backend.encode(image) - expected).abs().max().item() <= 1e-3

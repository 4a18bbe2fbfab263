"""The exact global threshold (SPEC §2-4): τ bit-identical to torch.kthvalue over torch.cat of
|θ|, and identical masks, on the cases that break radix selection."""
import pytest
import torch

from mgpp_kernels import MGPP, reference
from mgpp_kernels.masks import pack_mask
from mgpp_kernels.backends import load_backend

from conftest import assert_bitwise_equal, bits, gradient


def _from_bits(int_bits):
    return torch.tensor(int_bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def _random(n, seed, dtype=torch.float32, scale=0.02):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=generator) * scale).to(dtype)


def _ties():
    generator = torch.Generator().manual_seed(1)
    levels = torch.tensor([0.0, 0.125, -0.125, 0.3, -0.3, 0.7, 1e-3, -1e-3])
    values = levels[torch.randint(0, len(levels), (3000,), generator=generator)]
    return [values[:1000].view(10, 100), values[1000:2999], values[2999:]]


def _many_zeros():
    values = _random(5000, seed=2)
    values[torch.randperm(5000, generator=torch.Generator().manual_seed(2))[:3500]] = 0.0
    return [values[:2500], values[2500:].view(50, 50)]


def _denormals_fp32():
    generator = torch.Generator().manual_seed(3)
    subnormal = _from_bits(torch.randint(1, 1 << 23, (1500,), generator=generator).tolist())
    signs = torch.randint(0, 2, (1500,), generator=generator) * 2.0 - 1
    smallest_normals = torch.tensor([1.1754944e-38, -1.1754944e-38, 1.4e-45, 0.0])
    return [subnormal * signs, _random(500, seed=3), smallest_normals]


def _denormals_16bit():
    f16 = torch.arange(1, 1024, dtype=torch.int16).view(torch.float16)  # every fp16 subnormal
    bf16 = torch.arange(1, 128, dtype=torch.int16).view(torch.bfloat16)  # bf16 subnormals
    return [f16, bf16, -f16[::3].clone(), _random(200, seed=4, dtype=torch.float16, scale=1e-4)]


def _all_equal():
    return [torch.full((300,), -0.25), torch.full((7,), 0.25), torch.full((1,), 0.25)]


def _distinct():
    return [_random(4097, seed=5), _random(7, seed=6), _random(1, seed=7)]


def _one_element_tensors():
    return [_random(1, seed=10 + i) for i in range(40)]


def _empty_among():
    return [torch.empty(0), _random(50, seed=8), torch.empty(0, 3), _random(13, seed=9),
            torch.empty(0)]


def _mixed_dtypes():
    return [_random(1000, seed=11), _random(777, seed=12, dtype=torch.bfloat16),
            _random(513, seed=13, dtype=torch.float16), _random(1, seed=14, dtype=torch.bfloat16)]


def _negative_zeros():
    values = _random(1000, seed=15)
    values[::4] = -0.0
    values[1::8] = 0.0
    return [values, torch.full((5,), -0.0)]


def _all_bf16():
    return [_random(2000, seed=16, dtype=torch.bfloat16), _random(7, seed=17, dtype=torch.bfloat16),
            _random(1, seed=18, dtype=torch.bfloat16)]


def _one_high_bin():
    # Consecutive float32 values share their 16 high key bits: only the second radix level
    # separates them.
    base = int(torch.tensor(0.75).view(torch.int32))
    values = _from_bits(list(range(base, base + 3000)))
    signs = torch.randint(0, 2, (3000,), generator=torch.Generator().manual_seed(19)) * 2.0 - 1
    permutation = torch.randperm(3000, generator=torch.Generator().manual_seed(19))
    return [(values * signs)[permutation], _random(100, seed=19)]


def _several_chunks():
    # More than one CPU chunk (2^15 elements) per tensor, so several threads count.
    return [_random(70000, seed=20), _random(33000, seed=21, dtype=torch.float16)]


def _with_infinities():
    values = _random(500, seed=22)
    values[:5] = torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, float("inf")])
    return [values]


CASES = {
    "ties": _ties, "many_zeros": _many_zeros, "denormals_fp32": _denormals_fp32,
    "denormals_16bit": _denormals_16bit, "all_equal": _all_equal, "distinct": _distinct,
    "one_element_tensors": _one_element_tensors, "empty_among": _empty_among,
    "mixed_dtypes": _mixed_dtypes, "negative_zeros": _negative_zeros, "all_bf16": _all_bf16,
    "one_high_bin": _one_high_bin, "several_chunks": _several_chunks,
    "infinities": _with_infinities,
}


def _ranks(tensors):
    """k = 1, 2, N/3, N/2, N - 1, N, the count of exact zeros and one past it."""
    magnitudes = torch.cat([t.abs().flatten().float() for t in tensors])
    numel = magnitudes.numel()
    zeros = int((magnitudes == 0).sum())
    ranks = {1, 2, numel // 3, numel // 2, numel - 1, numel, zeros, zeros + 1}
    return sorted(k for k in ranks if 1 <= k <= numel)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_global_threshold_is_kthvalue(backend, case, request):
    if backend == "cpu" and case == "several_chunks":
        request.getfixturevalue("all_threads")  # threads count chunks into merged histograms
    tensors = CASES[case]()
    snapshot = [t.clone() for t in tensors]
    select = load_backend(backend).global_threshold
    for k in _ranks(tensors):
        expected = torch.kthvalue(torch.cat([t.abs().flatten().float() for t in tensors]), k).values
        tau = select(tensors, k)
        assert tau.dtype == torch.float32 and tau.dim() == 0
        assert bits(tau) == bits(expected), f"k={k}: τ {tau.item()!r} != {expected.item()!r}"
    for before, after in zip(snapshot, tensors):
        assert_bitwise_equal(after, before, "global_threshold changed its input")


def _optimizer(params, backend, k, **overrides):
    """t_i = 0 and t_end = 1: step 0 prunes to s_i, step 1 prunes to s_f = s_i and freezes;
    lr = 0 and weight_decay = 0 leave θ unchanged apart from pruning."""
    numel = sum(p.numel() for p in params)
    sparsity = (k + 0.5) / numel  # int(N·s) == k
    kwargs = dict(lr=0.0, weight_decay=0.0, num_train_examples=1000, initial_warmup_steps=0,
                  total_steps=2, initial_sparsity=sparsity, final_sparsity=sparsity)
    kwargs.update(overrides)
    return MGPP([{"params": params, "prune": True}], backend=backend, **kwargs)


def _prune_twice(tensors, backend, k, with_gradients):
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    optimizer = _optimizer(params, backend, k)
    taus, after = [], []
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = gradient(step, i, p) if with_gradients else None
        optimizer.step()
        stats = optimizer.stats()
        taus.append((stats["tau"], stats["pruned"]))
        after.append([p.detach().clone() for p in params])
    masks = [optimizer.state[p]["keep_mask"].clone() for p in params]
    return taus, after, masks


FINITE_CASES = sorted(set(CASES) - {"infinities", "several_chunks"})


@pytest.mark.parametrize("case", FINITE_CASES)
@pytest.mark.parametrize("with_gradients", [True, False], ids=["updated", "no_grad"])
def test_pruning_steps_match_the_reference(case, with_gradients):
    """Through the optimizer with lr = 0, so θ is the same in both backends: τ, the pruned
    weights and the packed keep masks of the freeze are identical, and equal kthvalue's."""
    tensors = CASES[case]()
    numel = sum(t.numel() for t in tensors)
    for k in sorted({k for k in _ranks(tensors) if k < numel} | {max(numel // 4, 1)}):
        expected_tau = reference.global_threshold(tensors, k)
        cpu = _prune_twice(tensors, "cpu", k, with_gradients)
        ref = _prune_twice(tensors, "reference", k, with_gradients)
        cpu_taus, cpu_after, cpu_masks = cpu
        ref_taus, ref_after, ref_masks = ref
        assert cpu_taus == ref_taus, f"k={k}"
        assert bits(torch.tensor(cpu_taus[0][0], dtype=torch.float32)) == bits(expected_tau), \
            f"k={k}"
        for i, (t, c, r) in enumerate(zip(tensors, cpu_after[0], ref_after[0])):
            pruned = t.abs().float() < expected_tau
            expected = t.masked_fill(pruned, 0)
            assert torch.equal(c, expected), f"k={k}, tensor {i}: pruned weights"
            assert_bitwise_equal(c, r, f"k={k}, tensor {i}")
        assert cpu_taus[0][1] == sum(int((t.abs().float() < expected_tau).sum()) for t in tensors)
        for i, (c, r) in enumerate(zip(cpu_after[1], ref_after[1])):
            assert_bitwise_equal(c, r, f"k={k}, tensor {i} after the freeze")
        tau_at_freeze = reference.global_threshold(ref_after[0], k)
        for i, (p, c, r) in enumerate(zip(ref_after[0], cpu_masks, ref_masks)):
            expected_mask = pack_mask(reference.keep_mask(p, tau_at_freeze))
            assert c.dtype == torch.uint8 and c.numel() == (p.numel() + 7) // 8
            assert torch.equal(c, expected_mask), f"k={k}, tensor {i}: cpu keep mask"
            assert torch.equal(r, expected_mask), f"k={k}, tensor {i}: reference keep mask"


@pytest.mark.parametrize("case", ["infinities", "several_chunks"])
def test_pruning_without_gradients_on_large_and_infinite_values(case, all_threads):
    tensors = CASES[case]()
    numel = sum(t.numel() for t in tensors)
    for k in (1, numel // 2, numel - 1):
        cpu_taus, cpu_after, cpu_masks = _prune_twice(tensors, "cpu", k, with_gradients=False)
        ref_taus, ref_after, ref_masks = _prune_twice(tensors, "reference", k,
                                                      with_gradients=False)
        assert cpu_taus == ref_taus
        assert cpu_taus[0][0] == reference.global_threshold(tensors, k).item()
        for c, r in zip(cpu_after[1] + cpu_masks, ref_after[1] + ref_masks):
            assert_bitwise_equal(c, r, f"k={k}")


@pytest.mark.parametrize("dtypes", [
    (torch.float32,), (torch.bfloat16,), (torch.float16,),
    (torch.float32, torch.bfloat16, torch.float16)], ids=lambda d: "+".join(map(str, d)))
def test_threshold_of_the_fused_update_is_exact(dtypes, all_threads):
    """With lr > 0 the event step ranks the updated θ from the histogram counted in the update
    pass: afterwards τ is still the k-th smallest |θ| (counting the zeros it made), nothing
    below τ survives and exactly `pruned` weights were zeroed."""
    shapes = [(64, 650), (7,), (1,), (0,), (30000,)]  # several chunks, so both threads count
    params = [torch.nn.Parameter(_random(torch.Size(s).numel(), seed=30 + i,
                                         dtype=dtypes[i % len(dtypes)]).view(s))
              for i, s in enumerate(shapes)]
    numel = sum(p.numel() for p in params)
    optimizer = _optimizer(params, "cpu", numel // 2, lr=1e-2, final_sparsity=0.9)
    for i, p in enumerate(params):
        p.grad = gradient(0, i, p, scale=1.0)
    optimizer.step()
    stats = optimizer.stats()
    tau, pruned = stats["tau"], stats["pruned"]
    magnitudes = torch.cat([p.detach().abs().flatten().float() for p in params])
    assert tau > 0
    assert int((magnitudes == 0).sum()) == pruned
    assert int((magnitudes < tau).sum()) == pruned
    assert pruned < numel // 2 <= pruned + int((magnitudes == tau).sum())

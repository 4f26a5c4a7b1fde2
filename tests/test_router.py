"""sparse_ops.plan.Router: the one place a layer's route is decided (typed paths, the gradient route, the default
variants kernels declare), and kernels that run what they are given."""
import pytest
import torch
import torch.nn.functional as F

from sparse_ops.dispatch import DENSE_KERNEL, KERNELS
from sparse_ops.errors import UserValueError
from sparse_ops.formats import CSR, TwoFour
from sparse_ops.kernels import ours_cpu
from sparse_ops.linear import SparseLinear
from sparse_ops.plan import BUCKETS, DENSE, TORCH, Path, Planner
from sparse_ops.plan_cache import PlanCache
from sparse_ops.quantized import CSRInt8, DenseInt8
from tests.test_cpu_kernels import needs_native
from tests.test_formats import two_four, unstructured


def layers():
    w = unstructured((24, 64), 0.8)
    yield SparseLinear(CSR.from_dense(w), torch.randn(24))
    yield SparseLinear(CSR.from_dense(w), torch_kernel=True)
    yield SparseLinear(TwoFour.from_dense(two_four((24, 64))), torch.randn(24))
    for cls in (CSRInt8, DenseInt8):
        yield SparseLinear(cls.from_dense(w), torch.randn(24))


@pytest.mark.parametrize("n", BUCKETS)
def test_every_path_reads_back_from_its_name_and_runs_the_product(n):
    for layer in layers():
        x = torch.randn(n, 64)
        want = F.linear(x, layer.dense_weight(), layer.bias)
        for path in layer.router.paths(n):
            assert Path.parse(str(path)) == path
            route = layer.router.bind(path, n)
            assert route.path == path and (route.variant == path.variant or not path.variant)
            with torch.inference_mode():
                torch.testing.assert_close(route(x, layer.bias), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("make,kind,kernel", [
    (lambda w: CSR.from_dense(w), TORCH, "torch.cpu.csr"),
    (lambda w: TwoFour.from_dense(two_four(tuple(w.shape))), TORCH, "torch.cpu.2:4"),
    (lambda w: CSRInt8.from_dense(w), DENSE, DENSE_KERNEL.name),
])
def test_a_call_that_needs_a_gradient_takes_a_kernel_with_a_backward_prepared_once(make, kind, kernel):
    layer = SparseLinear(make(unstructured((16, 32), 0.7)), torch.randn(16))
    first = layer.route(4, grad=True)
    assert first.path.kind == kind and first.kernel.name == kernel and first.kernel.grad
    assert layer.route(4, grad=True).state is first.state  # not prepared again per call
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, layer.dense_weight(), layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_every_kernel_with_variants_declares_its_default():
    for key, kernels in KERNELS.items():
        for k in kernels:
            assert (k.variants is None) == (k.pick is None), (key, k.name)
            assert not k.grad or k.backend == "torch", k.name  # ours have no backward yet


@needs_native
def test_an_unplanned_layer_runs_its_kernels_declared_default_variant():
    layer = SparseLinear(CSR.from_dense(unstructured((256, 1024), 0.5)))
    for n in (1, 8, 64, 256):
        route = layer.route(n)
        assert route.path == layer.router.own and route.variant == ours_cpu.pick_csr(layer.router.state, n)
    assert {layer.route(n).variant for n in (1, 256)} == {"plain", "panels"}


@needs_native
def test_our_cpu_kernels_refuse_an_input_that_wants_a_gradient():
    state = ours_cpu.prepare_csr(CSR.from_dense(unstructured((8, 16), 0.5)))
    with pytest.raises(UserValueError, match="no backward"):
        ours_cpu.csr_matmul(state, torch.randn(2, 16, requires_grad=True), None)
    with pytest.raises(UserValueError, match="unknown kernel variant 'splitk' for 2 tokens; allowed: plain, panels"):
        ours_cpu.csr_matmul(state, torch.randn(2, 16), None, variant="splitk")


def test_a_path_no_kernel_runs_is_refused_naming_the_layers_paths():
    layer = SparseLinear(TwoFour.from_dense(two_four((8, 16))))
    with pytest.raises(UserValueError, match="no kernel runs the path '2:4:torch'.*this layer's paths: dense"):
        layer.router.bind(Path(TORCH, "2:4"), 1)


def test_weights_prepared_for_timing_are_kept_only_for_chosen_paths():
    w = unstructured((16, 64), 0.8)
    timer = lambda fns, device: {k: 0.5 if k == "dense" else 1.0 for k in fns}  # noqa: E731
    layer = SparseLinear(CSR.from_dense(w), planner=Planner(timer=timer, cache=PlanCache(None)))
    assert str(layer.route(8).path) == DENSE
    assert set(layer.router._states) == {Path(DENSE)}  # torch's CSR, timed, is not kept

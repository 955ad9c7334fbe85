"""cbir.vectors.l2n: the one L2 normalisation, for numpy arrays and torch tensors."""

import numpy as np
import torch

from cbir.vectors import l2n


def test_rows_of_an_array_become_unit_float32_and_a_zero_row_stays_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], dtype=np.float64)
    y = l2n(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=np.finfo(np.float32).eps * 4)


def test_a_tensor_stays_a_tensor_of_its_dtype_normalised_along_the_axis_given():
    maps = torch.arange(1.0, 25.0, dtype=torch.float64).reshape(2, 3, 2, 2)
    y = l2n(maps, axis=1)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64 and y.shape == maps.shape
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(y, torch.from_numpy(l2n(maps.numpy(), axis=1)).double(), rtol=1e-6, atol=0)

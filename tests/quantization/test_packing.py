import pytest
import torch

from optimum_agentos.nn import packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 96, 577])
def test_pack_roundtrip_is_exact(bits, cols):
    codes = torch.randint(0, 1 << bits, (5, cols), generator=torch.Generator().manual_seed(cols))
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == 5 * packing.packed_row_bytes(cols, bits)
    assert torch.equal(packing.unpack(packed, bits, 5, cols).long(), codes)


@pytest.mark.parametrize("bits,per_byte", [(2, 4), (4, 2), (8, 1)])
def test_packed_density(bits, per_byte):
    assert packing.packed_row_bytes(1024, bits) == 1024 // per_byte


def test_int3_packs_eight_codes_in_three_bytes():
    assert packing.packed_row_bytes(1024, 3) == 1024 * 3 // 8
    codes = torch.arange(8).view(1, 8)  # 0..7, all 3-bit values
    assert packing.pack(codes, 3).tolist() == [0b10001000, 0b11000110, 0b11111010]


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="does not match its quantization_config"):
        packing.unpack(torch.zeros(10, dtype=torch.uint8), 4, 4, 8)

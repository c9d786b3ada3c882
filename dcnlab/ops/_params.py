from collections.abc import Sequence


def expand_param(value: int | Sequence[int], dims: int, name: str) -> list[int]:
    """An int or a sequence of `dims` ints as a list of `dims` ints; `name` is for the error."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * dims
    if (
        isinstance(value, Sequence)
        and len(value) == dims
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    raise ValueError(f"{name}: expected an int or a sequence of {dims} ints (one per spatial dim), got {value!r}")


def spatial_dims(input_dim: int, shape: tuple) -> int:
    dims = input_dim - 2
    if dims not in (1, 2, 3):
        raise ValueError(f"input: expected a 3-D, 4-D or 5-D tensor (B, C_in, *spatial), got shape {tuple(shape)}")
    return dims

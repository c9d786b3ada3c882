"""Model of merged grad_input reductions (no GPU): how many corner reductions remain when a corner
shared by neighbouring positions is reduced once, and a check that every contribution still lands
exactly once.

    python scripts/merge_model.py

Positions run along x in rows of a 64^D input (a tile of 128 consecutive positions, as in the
fused backward), offsets N(0, scale) per position and axis. Two rules:
- "sequential" (the 2-D paired im2col kernel, session 16): a team walks its positions in order; a
  corner of position r that is also one of r + 1 is deferred to r + 1 unless r received it itself.
- "local" (session 16's fused-backward patch, at a1d93ba; measured and dropped in session 17):
  deferred iff shared with r + 1 and not with r - 1; received iff shared with r - 1 and r - 1 does
  not share it with r - 2.
"""

import itertools

import numpy as np

SIZE = 64


def stencils(rng: np.random.Generator, n: int, dims: int, scale: float) -> np.ndarray:
    """Corner pixel ids (n, 2^dims) of n consecutive positions, -1 outside the input."""
    steps = np.arange(n)
    position = np.zeros((n, dims))
    position[:, -1] = steps % SIZE
    if dims >= 2:
        position[:, -2] = (steps // SIZE) % SIZE
    if dims == 3:
        position[:, 0] = steps // SIZE**2
    floor = np.floor(position + rng.normal(0, scale, (n, dims))).astype(int)
    corners = []
    for bits in itertools.product((0, 1), repeat=dims):
        corner = floor + np.array(bits)
        inside = np.all((corner >= 0) & (corner < SIZE), axis=1)
        pixel = np.ravel_multi_index(np.clip(corner, 0, SIZE - 1).T, (SIZE,) * dims)
        corners.append(np.where(inside, pixel, -1))
    return np.stack(corners, 1)


def merged_reductions(index: np.ndarray, values: np.ndarray, rule: str) -> tuple[int, dict]:
    rows, corners = index.shape

    def shares(row: int, pixel: int) -> bool:
        return 0 <= row < rows and pixel >= 0 and bool((index[row] == pixel).any())

    sums: dict = {}
    count = 0
    received = np.zeros(corners, dtype=bool)  # sequential rule: corners of this row that received
    for r in range(rows):
        next_received = np.zeros(corners, dtype=bool)
        for c in range(corners):
            pixel = int(index[r, c])
            if pixel < 0:
                continue
            if rule == "sequential":
                defer = shares(r + 1, pixel) and not received[c]
                receive = bool(received[c])
            else:
                defer = shares(r + 1, pixel) and not shares(r - 1, pixel)
                receive = shares(r - 1, pixel) and not shares(r - 2, pixel)
            if defer:
                next_received[int(np.nonzero(index[r + 1] == pixel)[0][0])] = True
                continue
            value = values[r, c]
            if receive:
                value += values[r - 1, int(np.nonzero(index[r - 1] == pixel)[0][0])]
            sums[pixel] = sums.get(pixel, 0.0) + value
            count += 1
        received = next_received
    return count, sums


def main() -> None:
    rng = np.random.default_rng(1)
    for dims, scale in [(1, 1.0), (2, 1.0), (2, 0.0), (3, 1.0)]:
        for rule in ("sequential", "local"):
            plain = merged = 0
            exact = True
            for _ in range(100):
                index = stencils(rng, 128, dims, scale)
                values = rng.normal(size=index.shape)
                truth: dict = {}
                for pixel, value in zip(index.ravel(), values.ravel(), strict=True):
                    if pixel >= 0:
                        truth[int(pixel)] = truth.get(int(pixel), 0.0) + value
                        plain += 1
                count, sums = merged_reductions(index, values, rule)
                merged += count
                exact &= truth.keys() == sums.keys() and all(abs(truth[k] - sums[k]) < 1e-9 for k in truth)
            print(f"{dims}D offsets N(0, {scale}), {rule:10s}: {merged / plain:.3f} of reductions, sums exact: {exact}")


if __name__ == "__main__":
    main()

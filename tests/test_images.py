"""PNG writing (``dpt_jax.images``): grids, and writes in the background while sampling goes on."""
import time

import numpy as np
import pytest
from PIL import Image

from dpt_jax import images
from dpt_jax.images import PngWriter, make_grid


def _image(k, size=16):
    return np.full((size, size, 3), k * 20, np.uint8)


def test_grid_places_images_row_by_row():
    grid = make_grid(np.stack([_image(k, 4) for k in range(5)]), columns=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert (grid[1, 1] == 0).all() and (grid[1, 6] == 20).all() and (grid[6, 6] == 80).all()
    assert (grid[6, 11] == 255).all()  # the sixth place is empty: padding white


def test_writer_writes_every_image_and_waits_for_them(tmp_path):
    with PngWriter(threads=2, max_pending=3) as writer:
        for k in range(10):
            writer.save_png(_image(k), str(tmp_path / "out" / f"{k}.png"))
            assert len(writer._pending) <= 3
    for k in range(10):  # all written when the block is left
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{k}.png")), _image(k))


def test_writer_raises_the_first_error_without_hiding_the_callers(tmp_path):
    (tmp_path / "taken.png").mkdir()  # a directory where a file should go
    with pytest.raises(IsADirectoryError):
        with PngWriter() as writer:
            writer.save_png(_image(1), str(tmp_path / "taken.png"))
    with pytest.raises(KeyError, match="the caller's"):
        with PngWriter() as writer:
            writer.save_png(_image(1), str(tmp_path / "taken.png"))
            raise KeyError("the caller's")


def test_writing_overlaps_the_callers_work(tmp_path, monkeypatch):
    # Each write takes 0.05 s (a stand-in for PNG compression, which releases the GIL), the
    # caller 0.1 s per batch of 4 images: in the background the writes hide behind the batches.
    real = images.save_png
    monkeypatch.setattr(images, "save_png", lambda image, path: (time.sleep(0.05), real(image, path)))

    def run(background):
        t0 = time.perf_counter()
        with PngWriter(threads=2) as writer:
            for batch in range(5):
                time.sleep(0.1)
                for k in range(4):
                    path = str(tmp_path / f"{background}_{batch}_{k}.png")
                    (writer.save_png if background else images.save_png)(_image(k), path)
        return time.perf_counter() - t0
    serial, background = run(False), run(True)
    print(f"5 batches of 4: {serial:.2f} s writing in the loop, {background:.2f} s in the background")
    assert background < 0.8 * serial

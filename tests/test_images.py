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
    with pytest.raises(ValueError, match=r"N >= 1, H, W, C\], got \(0, 4, 4, 3\)"):
        make_grid(np.zeros((0, 4, 4, 3), np.uint8))


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


def _pixels_of(path, colour, below):
    """Pixels of ``colour`` under row ``below`` (the legend's names are drawn above it)."""
    pixels = np.asarray(Image.open(path).convert("RGB"))[below:]
    return int(np.all(pixels == colour, axis=-1).sum())


def test_loss_plot_of_a_diverged_run_and_of_one_logged_step(tmp_path):
    from dpt_jax.plot import COLOURS, line_plot
    path = str(tmp_path / "losses.png")
    # An inf loss (a run that diverged) leaves the axes to the finite values; an all-NaN curve is skipped.
    line_plot({"loss": ([0, 1, 2, 3], [1.0, 0.5, float("inf"), 0.4]), "nan": ([0, 1], [float("nan")] * 2)}, path)
    assert _pixels_of(path, COLOURS[0], below=70) > 100
    # A run with one logged step: its point is drawn.
    line_plot({"one": ([5], [1.0]), "two": ([0, 10], [0.0, 2.0])}, path)
    assert _pixels_of(path, COLOURS[0], below=70) > 10 and _pixels_of(path, COLOURS[1], below=70) > 100
    with pytest.raises(ValueError, match="every series needs a point"):
        line_plot({"empty": ([], [])}, path)

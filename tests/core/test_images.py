import numpy as np
import pytest
from PIL import Image

from x2edit.images import MAX_PIXELS, as_rgb_image, load_image


def _save(tmp_path, img, name):
    path = tmp_path / name
    img.save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "I", "F", "1"])
def test_modes_convert_to_8bit_rgb(mode):
    img = as_rgb_image(Image.new(mode, (10, 9)))
    assert img.mode == "RGB" and img.size == (10, 9)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert as_rgb_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_is_rescaled_not_clipped():
    a = np.full((8, 8), 65535, dtype=np.uint16)
    a[0, 0] = 32768
    src = Image.fromarray(a)
    assert src.mode.startswith("I;16")
    img = as_rgb_image(src)
    assert img.getpixel((1, 1)) == (255, 255, 255) and img.getpixel((0, 0))[0] == 128


def test_files_corrupt_truncated_missing(tmp_path):
    good = _save(tmp_path, Image.new("RGB", (64, 64), (1, 2, 3)), "good.png")
    assert load_image(good).getpixel((5, 5)) == (1, 2, 3)
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="not an image"):
        load_image(tmp_path / "junk.png")
    rng = np.random.default_rng(0)
    noisy = _save(tmp_path, Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "noisy.png")
    (tmp_path / "cut.png").write_bytes(noisy.read_bytes()[:2000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")


def test_size_limits():
    with pytest.raises(ValueError, match="at least 8"):
        as_rgb_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="MP limit"):
        as_rgb_image(Image.new("L", (4097, 4097)).convert("RGB"), max_pixels=MAX_PIXELS)


def test_a_known_signature_followed_by_garbage_is_refused_in_one_line(tmp_path):
    """PIL raises OSError('Truncated File Read') from Image.open for these, before any decoding."""
    for name, head in [("sig.png", b"\x89PNG\r\n\x1a\n"), ("sig.jpg", b"\xff\xd8\xff\xe0"), ("sig.gif", b"GIF89a")]:
        (tmp_path / name).write_bytes(head + b"garbage" * 10)
        with pytest.raises(ValueError, match="corrupt or truncated|not an image") as e:
            load_image(tmp_path / name)
        assert "\n" not in str(e.value)


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with 'rotate 90' in EXIF is the portrait image viewers show."""
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "phone.jpg")
    assert upright.size == (10, 30)
    r, g, b = upright.getpixel((5, 2))  # the stored left edge is now the top
    assert r > 200 and b < 50

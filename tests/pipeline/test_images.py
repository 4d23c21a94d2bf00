import io

import numpy as np
import pytest
from PIL import Image

from pipeline.run.images import ImageError, InputError, discover_images, image_id, load_image, to_tensor


def _save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1", "I", "F"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    arr = (np.arange(20 * 30 * 3) % 256).astype(np.uint8).reshape(20, 30, 3)
    img = Image.fromarray(arr).convert(mode) if mode not in ("I;16",) else Image.fromarray((arr[..., 0].astype(np.uint16) * 257))
    ext = "tif" if mode in ("I;16", "I", "F", "CMYK") else "png"
    path = _save(img, tmp_path / f"x.{ext}")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (30, 20)


def test_alpha_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = load_image(_save(img, tmp_path / "a.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    img = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    out = load_image(_save(img, tmp_path / "a.png"))
    assert 120 <= out.getpixel((0, 0))[0] <= 135


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    out = load_image(_save(img, tmp_path / "p.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = load_image(str(path)).getpixel((4, 4))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "r.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_image(str(path)).size == (20, 40)


def test_huge_image_is_downscaled(tmp_path):
    path = _save(Image.new("RGB", (3000, 100)), tmp_path / "w.png")
    assert max(load_image(path, max_side=1000).size) == 1000


@pytest.mark.parametrize("content, reason", [
    (b"", "file is empty"),
    (b"this is not an image at all", "not an image"),
])
def test_bad_files_give_reasons(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(str(path))


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path = tmp_path / "t.png"
    path.write_bytes(buf.getvalue()[:300])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(str(path))


def test_ids_never_collide_and_are_stable():
    rels = ["a.jpg", "a.png", "x/a.jpg", "y/a.jpg", "x_a.jpg", "x__a.jpg"]
    ids = [image_id(r) for r in rels]
    assert len(set(ids)) == len(rels)
    assert ids == [image_id(r) for r in rels]
    assert all("/" not in i for i in ids)


def test_discovery_folder_list_and_single(tmp_path):
    for rel in ["b.png", "sub/a.jpg", "sub/deeper/c.webp", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    refs = discover_images(tmp_path)
    assert [r.rel for r in refs] == ["b.png", "sub/a.jpg", "sub/deeper/c.webp"]
    assert [r.rel for r in discover_images(tmp_path, ("*.jpg",))] == ["sub/a.jpg"]
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nb.png\nsub/a.jpg\n")
    assert [r.rel for r in discover_images(lst)] == ["b.png", "sub/a.jpg"]
    assert [r.rel for r in discover_images(tmp_path / "b.png")] == ["b.png"]
    with pytest.raises(InputError, match="input not found"):
        discover_images(tmp_path / "missing")


def test_to_tensor_shape_and_range():
    x = to_tensor(Image.new("RGB", (50, 30), (255, 0, 0)), 32)
    assert x.shape == (3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1

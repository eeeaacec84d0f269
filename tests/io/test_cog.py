"""Masks as cloud-optimized GeoTIFF (rio-cogeo's validator) and as OME-TIFF (tifffile's OME reader)."""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
import rasterio
import tifffile
from rio_cogeo.cogeo import cog_validate

from gigaseg.io.cog import relayout_cog
from gigaseg.io.sources import open_image
from gigaseg.io.writers import MaskWriter, mask_classes, mask_palette, write_tiled_tiff

GEO_TAGS = [
    (33550, 12, 3, (0.5, 0.5, 0.0)),  # ModelPixelScaleTag: 0.5 m pixels
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 4200000.0, 0.0)),  # ModelTiepointTag
    (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)),  # projected, EPSG:32633
    (34737, 2, 0, "WGS 84 / UTM zone 33N|"),
]
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 0]], np.uint8)
CLASSES = ["background", "urban", "forest", "water", "road"]
OME_SIZE = {"PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm"}


def labels(height, width):
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    return ((rows // 37 + cols // 53 + (rows * cols) % 3) % len(CLASSES)).astype(np.uint8)


def write_mask(path, height=1500, width=1300, tile=256, **kw):
    data = labels(height, width)
    with MaskWriter(path, height, width, tile=tile, palette=PALETTE, class_names=CLASSES, **kw) as writer:
        for top in writer.band_tops:
            writer.write_band(top, data[top : top + tile])
    return data


def validate(path):
    return cog_validate(str(path), strict=True, quiet=True)


def test_georeferenced_mask_is_a_valid_cog_with_its_pyramid_crs_palette_and_classes(tmp_path):
    path = tmp_path / "mask.tif"
    data = write_mask(path, geo_tags=GEO_TAGS)

    assert validate(path) == (True, [], [])
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 32633
        assert src.transform == rasterio.Affine(0.5, 0, 500000.0, 0, -0.5, 4200000.0)
        assert src.overviews(1) == [2, 4]  # the reduced levels are GDAL's internal overviews
        assert src.block_shapes == [(256, 256)]
        assert src.colormap(1)[4] == (250, 250, 0, 255)
        np.testing.assert_array_equal(src.read(1), data)
        np.testing.assert_array_equal(src.read(1, out_shape=(375, 325)), data[::4, ::4])  # nearest pyramid
    with tifffile.TiffFile(path) as tif:
        offsets = [page.offset for page in tif.pages]
        first_tile = [min(o for o in page.dataoffsets if o) for page in tif.pages]
        assert offsets == sorted(offsets) and offsets[0] == 16 and max(offsets) < min(first_tile)  # IFDs first
        assert first_tile == sorted(first_tile, reverse=True)  # the smallest level's tiles first
        assert [level.shape for level in tif.series[0].levels] == [(1500, 1300), (750, 650), (375, 325)]
        assert mask_classes(tif) == CLASSES
        np.testing.assert_array_equal(mask_palette(tif)[: len(PALETTE)], PALETTE)
    with open_image(path) as source:  # gigaseg's own reader still finds the levels
        assert source.levels == [(1500, 1300), (750, 650), (375, 325)]
        assert source.geo_tags[0][3] == (0.5, 0.5, 0.0)


def test_the_validator_refuses_the_layouts_written_level_by_level(tmp_path):
    data = labels(1500, 1300)

    def render(window):
        return data[window.slices]

    subifds = write_tiled_tiff(
        tmp_path / "subifds.tif", 1500, 1300, 1, np.uint8, render, tile=256, pyramid_levels=2, geo_tags=GEO_TAGS
    )
    valid, errors, _ = validate(subifds)  # what MaskWriter wrote before: the full resolution's tiles come first
    assert not valid and any("main resolution image should be after" in e for e in errors), errors

    chained = tmp_path / "chained.tif"  # main-chain levels, each IFD followed by its own tiles
    with tifffile.TiffWriter(chained, bigtiff=True) as writer:
        for k in range(3):
            extra = {"extratags": [(*tag, True) for tag in GEO_TAGS]} if k == 0 else {"subfiletype": 1}
            writer.write(data[:: 2**k, :: 2**k], tile=(256, 256), compression="zlib", metadata=None, **extra)
    valid, errors, _ = validate(chained)
    assert not valid and any("should be after" in e for e in errors), errors

    relaid = relayout_cog(chained, tmp_path / "relaid.tif")
    assert validate(relaid) == (True, [], [])


def test_relayout_copies_every_tag_and_tile_unchanged(tmp_path):
    data = labels(700, 450)
    source = tmp_path / "levels.tif"
    with tifffile.TiffWriter(source, bigtiff=True) as writer:
        writer.write(data, tile=(64, 64), compression="zlib", description='{"classes": ["x"]}', metadata=None)
        writer.write(data[::2, ::2], tile=(64, 64), compression="zlib", subfiletype=1, metadata=None)
    target = relayout_cog(source, tmp_path / "cog.tif")
    with tifffile.TiffFile(source) as before, tifffile.TiffFile(target) as after:
        assert len(before.pages) == len(after.pages) == 2
        for old, new in zip(before.pages, after.pages, strict=True):
            kept = {code: tag.value for code, tag in old.tags.items() if code not in (324, 325)}
            assert {code: tag.value for code, tag in new.tags.items() if code not in (324, 325)} == kept
            assert tuple(new.databytecounts) == tuple(old.databytecounts)
            np.testing.assert_array_equal(new.asarray(), old.asarray())
        assert after.pages[0].description == '{"classes": ["x"]}'
    assert target.stat().st_size <= source.stat().st_size + 64


def test_a_mask_smaller_than_a_tile_is_a_valid_cog_too(tmp_path):
    path = tmp_path / "small.tif"
    write_mask(path, height=200, width=120, tile=256, geo_tags=GEO_TAGS)
    assert validate(path) == (True, [], [])


def test_ome_mask_keeps_the_physical_pixel_size_and_classes(tmp_path):
    path = tmp_path / "slide.tif"
    data = write_mask(path, height=600, width=500, tile=128, ome=OME_SIZE)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        pixels = next(e for e in ElementTree.fromstring(tif.ome_metadata).iter() if e.tag.endswith("}Pixels"))
        assert float(pixels.get("PhysicalSizeX")) == 0.25 and float(pixels.get("PhysicalSizeY")) == 0.5
        assert pixels.get("PhysicalSizeXUnit") == "µm"
        assert mask_classes(tif) == CLASSES
        assert len(tif.pages[0].subifds) == 2  # OME-TIFF keeps its pyramid in SubIFDs
        levels = tif.series[0].levels
        np.testing.assert_array_equal(levels[0].asarray(), data)
        np.testing.assert_array_equal(levels[2].asarray(), data[::4, ::4])
    with open_image(path) as source:
        assert source.ome_pixel_size == OME_SIZE


def test_plain_tiff_has_no_ome_size_and_json_classes(tmp_path):
    path = tmp_path / "plain.tif"
    write_mask(path, height=100, width=90, tile=32)
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_ome
        assert json.loads(tif.pages[0].description) == {"classes": CLASSES}
    with open_image(path) as source:
        assert source.ome_pixel_size is None


def test_ome_metadata_with_the_cog_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="SubIFDs"):
        write_tiled_tiff(
            tmp_path / "x.tif", 64, 64, 1, np.uint8, None, tile=16, pyramid_layout="cog", ome_metadata=OME_SIZE
        )
    with pytest.raises(ValueError, match="pyramid_layout"):
        write_tiled_tiff(tmp_path / "x.tif", 64, 64, 1, np.uint8, None, tile=16, pyramid_layout="tiles")


@pytest.mark.parametrize("kind", ["geotiff", "ome"])
def test_predict_writes_a_cog_for_a_geotiff_and_an_ome_tiff_for_an_ome_input(tmp_path, tiny_checkpoint, kind):
    import gigaseg

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (520, 600, 3), dtype=np.uint8)
    if kind == "geotiff":
        scene = tmp_path / "scene.tif"
        tifffile.imwrite(scene, image, tile=(128, 128), extratags=[(*tag, True) for tag in GEO_TAGS])
    else:
        scene = tmp_path / "scene.ome.tif"
        tifffile.imwrite(scene, image, tile=(128, 128), ome=True, metadata={"axes": "YXS", **OME_SIZE})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gigaseg.predict(tiny_checkpoint, scene, out=tmp_path / "out", progress=False)
    assert result.mask_path == tmp_path / "out" / "scene.tif"
    with tifffile.TiffFile(result.mask_path) as tif:
        assert tif.is_ome == (kind == "ome")
        assert mask_classes(tif) == ["a", "b", "c"]
    if kind == "geotiff":
        assert validate(result.mask_path) == (True, [], [])
        with rasterio.open(result.mask_path) as src:
            assert src.crs.to_epsg() == 32633 and src.transform.a == 0.5
    else:
        with open_image(result.mask_path) as mask:
            assert mask.ome_pixel_size == OME_SIZE

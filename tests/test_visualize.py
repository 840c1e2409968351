"""Pictures: mask overlay, candidate grid, and atomic PNG writing."""
import cv2
import numpy as np
import pytest

from deris_rerank import visualize
from deris_rerank.errors import InputError, OutputError
from deris_rerank.visualize import candidate_grid, overlay, save_png

HEIGHT, WIDTH = 48, 64


@pytest.fixture
def image():
    """uint8 [48, 64, 3] RGB with distinct values per channel, so a channel swap shows."""
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    return np.stack([cols * 3, rows * 5, np.full_like(rows, 30)], axis=-1).astype(np.uint8)


def box(top, left, bottom, right):
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[top:bottom, left:right] = True
    return mask


def test_overlay_tints_inside_and_keeps_far_pixels(image):
    mask = box(10, 10, 30, 40)
    before = image.copy()
    result = overlay(image, mask, color=(200, 0, 100), alpha=0.5)
    np.testing.assert_array_equal(image, before)  # input untouched
    assert result.dtype == np.uint8 and result.shape == image.shape
    np.testing.assert_array_equal(result[~mask], image[~mask])  # the border stays inside the mask
    interior = box(12, 12, 28, 38)
    expected = np.rint(0.5 * image[interior] + 0.5 * np.array([200, 0, 100])).astype(np.uint8)
    np.testing.assert_array_equal(result[interior], expected)


def test_overlay_border_is_two_pixels_solid(image):
    mask = box(10, 10, 30, 40)
    result = overlay(image, mask, color=(200, 0, 100))
    border = mask & ~box(12, 12, 28, 38)
    assert (result[border] == (200, 0, 100)).all()
    assert not (result[box(12, 12, 28, 38)] == (200, 0, 100)).all(axis=-1).any()


def test_overlay_border_at_image_edge(image):
    mask = box(0, 0, 10, 10)
    result = overlay(image, mask, color=(200, 0, 100))
    assert (result[0, :10] == (200, 0, 100)).all() and (result[:10, 1] == (200, 0, 100)).all()


def test_overlay_draws_outline_without_fill(image):
    mask = box(5, 5, 15, 15)
    outline = box(20, 30, 40, 60)
    result = overlay(image, mask, outline=outline, outline_color=(1, 2, 3))
    outline_border = outline & ~box(22, 32, 38, 58)
    assert (result[outline_border] == (1, 2, 3)).all()
    np.testing.assert_array_equal(result[box(22, 32, 38, 58)], image[box(22, 32, 38, 58)])
    far = ~(mask | outline)
    np.testing.assert_array_equal(result[far], image[far])


def test_overlay_rejects_mismatched_mask(image):
    with pytest.raises(InputError):
        overlay(image, np.zeros((HEIGHT, WIDTH + 1), bool))


def test_candidate_grid_shape_and_selected_frame(image):
    masks = np.stack([box(4 * i, 2 * i, 4 * i + 8, 2 * i + 20) for i in range(10)])
    scores = np.linspace(0.9, 0.1, 10)
    grid = candidate_grid(image, masks, scores, selected=7, default=0, columns=5, tile=64)
    assert grid.shape == (128, 320, 3) and grid.dtype == np.uint8

    def frame_of(index):
        row, column = divmod(index, 5)
        cell = grid[row * 64:(row + 1) * 64, column * 64:(column + 1) * 64]
        return np.concatenate([cell[0], cell[-1], cell[:, 0], cell[:, -1]])

    assert (frame_of(7) == visualize.SELECTED_FRAME_COLOR).all()
    for index in (0, 3, 9):
        assert not (frame_of(index) == visualize.SELECTED_FRAME_COLOR).all(axis=-1).any()


def test_candidate_grid_tiles_differ_by_mask_and_label(image):
    masks = np.stack([box(0, 0, 48, 32), box(0, 32, 48, 64)])
    grid = candidate_grid(image, masks, [0.5, 0.5], selected=0, default=1, columns=5, tile=64)
    assert grid.shape == (64, 128, 3)  # fewer candidates than columns: no empty cells
    left, right = grid[:, :64], grid[:, 64:]
    mid = slice(24, 40)
    tint = np.array(visualize.MASK_COLOR)
    left_dist = np.abs(left[mid, 8:24].astype(int) - tint).sum(-1).mean()
    right_dist = np.abs(right[mid, 8:24].astype(int) - tint).sum(-1).mean()
    assert left_dist < right_dist  # candidate 0 tints the left half of its tile
    bottom = grid[40:].astype(int)  # the "default" label: anti-aliased yellow on black (blue 0)
    yellow = (bottom[..., 2] == 0) & (bottom[..., 0] > 64) & (bottom[..., 1] > bottom[..., 0] // 2)
    assert yellow[:, 64:].sum() > 10 and not yellow[:, :64].any()


def test_candidate_grid_keeps_aspect(image):
    tall = np.ascontiguousarray(image.transpose(1, 0, 2))  # [64, 48, 3]
    grid = candidate_grid(tall, np.ones((1, 64, 48), bool), [1.0], selected=0, default=0, tile=32)
    assert grid.shape == (32, 32, 3)
    # the 32 x 24 image sits in columns 4-27; the selected frame covers columns 0-1 and 30-31
    for column, color in ((1, "SELECTED_FRAME_COLOR"), (3, "TILE_BACKGROUND"), (4, "MASK_COLOR"),
                          (27, "MASK_COLOR"), (28, "TILE_BACKGROUND"), (30, "SELECTED_FRAME_COLOR")):
        assert (grid[12:20, column] == getattr(visualize, color)).all(), column


@pytest.mark.parametrize(
    "kwargs",
    [dict(scores=[0.1]), dict(selected=2), dict(default=-1)],
)
def test_candidate_grid_rejects_bad_arguments(image, kwargs):
    arguments = dict(masks=np.zeros((2, HEIGHT, WIDTH), bool), scores=[0.1, 0.2], selected=0, default=1)
    with pytest.raises(InputError):
        candidate_grid(image, **{**arguments, **kwargs})


def test_save_png_round_trip_rgb(tmp_path, image):
    target = tmp_path / "picture.png"
    assert save_png(target, image) == target
    read_back = cv2.imread(str(target), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(cv2.cvtColor(read_back, cv2.COLOR_BGR2RGB), image)
    assert target.read_bytes().startswith(b"\x89PNG")
    assert [path.name for path in tmp_path.iterdir()] == ["picture.png"]


def test_save_png_bool_mask(tmp_path):
    mask = box(3, 4, 20, 50)
    save_png(tmp_path / "mask.png", mask)
    read_back = cv2.imread(str(tmp_path / "mask.png"), cv2.IMREAD_UNCHANGED)
    assert read_back.dtype == np.uint8 and read_back.shape == mask.shape
    np.testing.assert_array_equal(read_back, np.where(mask, 255, 0))


def test_save_png_missing_folder(tmp_path, image):
    target = tmp_path / "missing" / "picture.png"
    with pytest.raises(OutputError, match="missing"):
        save_png(target, image)
    assert list(tmp_path.iterdir()) == []


def test_save_png_unwritable_target_leaves_no_temp_file(tmp_path, image):
    target = tmp_path / "picture.png"
    target.mkdir()  # renaming a file over a folder fails after the temp file is written
    with pytest.raises(OutputError, match="picture.png") as info:
        save_png(target, image)
    assert "\n" not in str(info.value)
    assert [path.name for path in tmp_path.iterdir()] == ["picture.png"]
    assert list(target.iterdir()) == []


def test_save_png_rejects_other_arrays(tmp_path):
    with pytest.raises(InputError):
        save_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))


def test_decision_overlay_picks_a_colour_unlike_the_region_and_adds_a_legend():
    from deris_rerank.visualize import PALETTE, decision_overlay

    image = np.full((240, 320, 3), 128, np.uint8)
    image[100:200, 100:220] = (250, 40, 40)  # a red object
    mask = np.zeros((240, 320), bool)
    mask[100:200, 100:220] = True
    picture = decision_overlay(image, mask)
    border = tuple(int(v) for v in picture[100, 150])
    assert border in PALETTE and border != (255, 64, 64)  # not red on a red object
    assert np.array_equal(picture[0:10, 0:3], np.zeros((10, 3, 3), np.uint8))  # the legend's dark box
    assert np.array_equal(picture[230:, 250:], image[230:, 250:])  # elsewhere untouched

    default = np.zeros((240, 320), bool)
    default[20:80, 240:300] = True
    switched = decision_overlay(image, mask, default)
    outline = tuple(int(v) for v in switched[20, 270])
    assert outline in PALETTE and outline != border
    rows_with_legend = np.flatnonzero((switched[:, 1] == 0).all(axis=1))
    assert rows_with_legend.max() > np.flatnonzero((picture[:, 1] == 0).all(axis=1)).max()  # two legend lines


def test_decision_overlay_leaves_out_the_legend_on_tiny_images():
    from deris_rerank.visualize import decision_overlay

    image = np.full((20, 24, 3), 90, np.uint8)
    mask = np.zeros((20, 24), bool)
    mask[5:15, 5:15] = True
    picture = decision_overlay(image, mask)
    assert np.array_equal(picture[~mask], image[~mask])

"""shrink_dataset.py (classification/shrink.py): the shrunk copy's sizes, names, classes and file counts, that the
trainers' loaders read it, resuming (a real SIGTERM to a run with 2 workers, slow tier), and each bad input refused
in one line with exit 2 before anything is written. On JPEG and PNG files the tests write."""
import collections
import io
import os
import re
import shutil
import signal

import numpy as np
import pytest
from PIL import Image

from conftest import read_until, run_script, start_process

from classification import data, fast_jpeg, output_folder, shrink
import shrink_dataset

MAX_SIDE = 96


def picture(width, height, seed=0, mode='RGB'):
    """A smooth picture with some grain (JPEG-like file sizes), in `mode`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = pixels + rng.normal(0, 4, (height, width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)


def add_files(root):
    """JPEGs and PNGs of several sizes and modes beside the small JPEGs of sample_data (all within MAX_SIDE)."""
    extra = {'train/class_00/wide.jpg': picture(300, 200), 'train/class_00/tall.JPEG': picture(120, 333, 1),
             'train/class_00/photo.png': picture(250, 180, 2), 'train/class_01/grey.jpeg': picture(200, 150, 3, 'L'),
             'train/class_01/rgba.png': picture(80, 60, 4, 'RGBA'), 'train/class_01/dup.jpg': picture(90, 40, 5),
             'train/class_01/dup.png': picture(70, 50, 6), 'val/class_02/square.png': picture(400, 400, 7)}
    for relative, image in extra.items():
        image.save(os.path.join(root, relative))


@pytest.fixture
def source(jpeg_dataset, tmp_path):
    root = str(tmp_path / 'source')
    shutil.copytree(jpeg_dataset, root)
    add_files(root)
    return root


def pairs(source):
    """(source file, its file in the copy relative to DEST) for every image of source."""
    names = shrink.output_names(shrink.list_source(source))
    return sorted(names.items())


def tree(folder):
    """Every path under folder with its size and mtime: what 'nothing written' compares."""
    found = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(top, name)
            stat = os.lstat(path)
            found[path] = (stat.st_size, stat.st_mtime_ns)
    return found


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_the_copy_has_the_classes_and_files_of_the_source_each_at_most_max_side_aspect_kept_never_upscaled(
        source, tmp_path, capsys):
    dest = str(tmp_path / 'copy')
    assert shrink.run(source, dest, MAX_SIDE, 90, workers=0) == 0
    for split in ('train', 'val'):
        original, copy = data.scan(os.path.join(source, split)), data.scan(os.path.join(dest, split))
        assert copy['classes'] == original['classes']
        count = collections.Counter
        assert count(label for _, label in copy['samples']) == count(label for _, label in original['samples'])
    resized = 0
    for path, relative in pairs(source):
        width, height = Image.open(path).size
        with Image.open(os.path.join(dest, relative)) as shrunk:
            assert shrunk.format == 'JPEG', relative
            new_width, new_height = shrunk.size
        if max(width, height) <= MAX_SIDE:
            assert (new_width, new_height) == (width, height), f'{relative} was resized'
        else:
            resized += 1
            scale = MAX_SIDE / max(width, height)
            assert max(new_width, new_height) == MAX_SIDE
            assert abs(new_width - width * scale) <= 0.5 and abs(new_height - height * scale) <= 0.5, relative
    assert resized == 5
    summary = capsys.readouterr().out
    assert re.search(r'^\d+ files written, 0 skipped as already there, 0 unreadable; [\d,]+ bytes', summary, re.M)


def test_jpegs_within_the_limit_are_copied_byte_for_byte_and_other_files_become_jpegs_named_jpg(source, tmp_path):
    dest = str(tmp_path / 'copy')
    assert shrink.run(source, dest, MAX_SIDE, 90, workers=0) == 0
    names = dict(pairs(source))
    folder = os.path.join(source, 'train', 'class_00')
    small_jpeg = os.path.join(folder, min(name for name in os.listdir(folder) if name.startswith('train_')))
    assert names[small_jpeg] == os.path.relpath(small_jpeg, source)  # name kept
    with open(small_jpeg, 'rb') as a, open(os.path.join(dest, names[small_jpeg]), 'rb') as b:
        assert a.read() == b.read()
    assert names[os.path.join(source, 'train/class_00/tall.JPEG')] == 'train/class_00/tall.JPEG'
    assert names[os.path.join(source, 'train/class_01/grey.jpeg')] == 'train/class_01/grey.jpeg'
    assert names[os.path.join(source, 'train/class_00/photo.png')] == 'train/class_00/photo.jpg'
    assert names[os.path.join(source, 'train/class_01/rgba.png')] == 'train/class_01/rgba.jpg'  # within: re-encoded
    # a name clash: dup.jpg keeps its name, dup.png gets .jpg after its whole name
    assert names[os.path.join(source, 'train/class_01/dup.jpg')] == 'train/class_01/dup.jpg'
    assert names[os.path.join(source, 'train/class_01/dup.png')] == 'train/class_01/dup.png.jpg'
    with Image.open(os.path.join(dest, 'train/class_01/dup.png.jpg')) as image:
        assert image.format == 'JPEG' and image.size == (70, 50)


def test_exif_orientation_is_left_as_the_trainers_loader_sees_it(tmp_path):
    source = tmp_path / 'source'
    os.makedirs(source / 'train' / 'a')
    image = picture(600, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to show": viewers would show it 300x600
    path = str(source / 'train' / 'a' / 'rotated.jpg')
    image.save(path, quality=95, exif=exif.tobytes())
    seen = data.checked_pil_loader(path)
    assert seen.size == (600, 300)  # the trainers' loader does not rotate
    assert shrink.run(str(source), str(tmp_path / 'copy'), 200, 90, workers=0) == 0
    with Image.open(tmp_path / 'copy' / 'train' / 'a' / 'rotated.jpg') as copy:
        assert copy.size == (200, 100)
        assert 0x0112 not in copy.getexif()  # no tag that would make a viewer rotate it
        expected = np.asarray(seen.resize((200, 100), Image.LANCZOS), dtype=np.float32)
        assert np.abs(np.asarray(copy.convert('RGB'), dtype=np.float32) - expected).mean() < 3


def test_the_trainers_loaders_read_the_copy_with_the_same_class_list(source, tmp_path):
    dest = str(tmp_path / 'copy')
    assert shrink.run(source, dest, MAX_SIDE, 90, workers=0) == 0
    for split in ('train', 'val'):
        original = data.image_folder(os.path.join(source, split), data.eval_transform(40, 32))
        copy = data.image_folder(os.path.join(dest, split), data.eval_transform(40, 32))
        assert copy.classes == original.classes and len(copy) == len(original)
        for index in range(len(copy)):  # the MP loader's reading of every file
            image, _ = copy[index]
            assert tuple(image.shape) == (3, 32, 32)
        batch, labels = fast_jpeg.EvalBatches(copy.samples, 40, 32)[list(range(len(copy)))]  # FAST's
        assert tuple(batch.shape) == (len(copy), 3, 32, 32)
        assert sorted(labels.tolist()) == sorted(label for _, label in original.samples)


def test_a_rerun_skips_the_files_there_removes_leftover_temporary_files_and_writes_empty_ones_again(
        source, tmp_path, capsys):
    dest = str(tmp_path / 'copy')
    assert shrink.run(source, dest, MAX_SIDE, 90, workers=0) == 0
    copies = sorted(os.path.join(dest, relative) for _, relative in pairs(source))
    os.remove(copies[0])
    open(copies[1], 'w').close()  # what a machine crash can leave: an empty file under the final name
    leftover = os.path.join(os.path.dirname(copies[2]), '.x.jpg.12345.0123abcd.tmp')
    open(leftover, 'wb').close()
    before = {path: os.stat(path).st_mtime_ns for path in copies[2:]}
    capsys.readouterr()
    assert shrink.run(source, dest, MAX_SIDE, 90, workers=0) == 0
    out = capsys.readouterr().out
    assert 'Removed 1 unfinished temporary file(s)' in out
    assert f'2 files written, {len(copies) - 2:,} skipped as already there, 0 unreadable' in out
    assert not os.path.exists(leftover)
    assert {path: os.stat(path).st_mtime_ns for path in copies[2:]} == before  # kept, not written again
    for path in copies[:2]:
        with Image.open(path) as image:
            image.load()


def test_an_unreadable_image_is_skipped_with_one_line_naming_it_counted_and_exit_status_1(source, tmp_path, capsys):
    folder = os.path.join(source, 'train', 'class_00')
    encoded = io.BytesIO()
    picture(300, 200).save(encoded, format='JPEG')
    with open(os.path.join(folder, 'cut.jpg'), 'wb') as f:
        f.write(encoded.getvalue()[:2000])  # cut short
    with open(os.path.join(folder, 'text.png'), 'w') as f:
        f.write('not an image')
    dest = str(tmp_path / 'copy')
    assert shrink.run(source, dest, MAX_SIDE, 90, workers=0) == 1
    captured = capsys.readouterr()
    skipped = [line for line in lines(captured.err) if line.startswith('skipped: ')]
    assert len(skipped) == 2
    assert "cut.jpg'" in skipped[0] and "text.png'" in skipped[1]
    assert ', 2 unreadable;' in captured.out
    assert not os.path.exists(os.path.join(dest, 'train', 'class_00', 'cut.jpg'))
    assert not os.path.exists(os.path.join(dest, 'train', 'class_00', 'text.jpg'))
    assert len(os.listdir(os.path.join(dest, 'train', 'class_00'))) == len(os.listdir(folder)) - 2


def test_a_stop_signal_lets_the_file_in_progress_finish_and_ends_with_one_line_and_128_plus_n(
        source, tmp_path, capsys, monkeypatch):
    written = []
    shrink_file = shrink.shrink_file

    def then_ctrl_c(*task):
        result = shrink_file(*task)
        written.append(task[1])
        if len(written) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the third file is written
        return result
    monkeypatch.setattr(shrink, 'shrink_file', then_ctrl_c)
    dest = str(tmp_path / 'copy')
    handler_before = signal.getsignal(signal.SIGINT)
    assert shrink.run(source, dest, MAX_SIDE, 90, workers=0) == 128 + signal.SIGINT
    captured = capsys.readouterr()
    assert '3 files written, 0 skipped' in captured.out
    stopped = [line for line in lines(captured.err) if 'stopped by' in line]
    assert len(stopped) == 1 and stopped[0].startswith('stopped by SIGINT: ')
    assert all(os.path.getsize(path) > 0 for path in written)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler it found is back


def make_source(tmp_path, folders=(('train', 'a'), ('val', 'a'))):
    root = tmp_path / 'source'
    for split, name in folders:
        os.makedirs(root / split / name)
        picture(120, 90).save(root / split / name / 'x.jpg')
    return str(root)


def case_dest_is_source(tmp_path):
    source = make_source(tmp_path)
    return [source, source], 'DEST'


def case_dest_inside_source(tmp_path):
    source = make_source(tmp_path)
    return [source, os.path.join(source, 'small')], 'DEST'


def case_source_inside_dest(tmp_path):
    source = make_source(tmp_path)
    return [source, str(tmp_path)], 'DEST'


def case_source_missing(tmp_path):
    return [str(tmp_path / 'nowhere'), str(tmp_path / 'copy')], 'SOURCE'


def case_source_without_splits(tmp_path):
    os.makedirs(tmp_path / 'source' / 'a')
    picture(120, 90).save(tmp_path / 'source' / 'a' / 'x.jpg')
    return [str(tmp_path / 'source'), str(tmp_path / 'copy')], 'SOURCE'


def case_source_without_class_folders(tmp_path):
    os.makedirs(tmp_path / 'source' / 'train')
    return [str(tmp_path / 'source'), str(tmp_path / 'copy')], 'SOURCE'


def case_class_folder_without_images(tmp_path):
    source = make_source(tmp_path)
    os.makedirs(os.path.join(source, 'train', 'b'))
    with open(os.path.join(source, 'train', 'b', 'notes.txt'), 'w') as f:
        f.write('no images here')
    return [source, str(tmp_path / 'copy')], 'SOURCE'


def flag_case(*flags):
    def case(tmp_path):
        return [make_source(tmp_path), str(tmp_path / 'copy'), *flags], flags[0]
    return case


def case_dest_of_other_settings(tmp_path):
    source = make_source(tmp_path)
    assert shrink.run(source, str(tmp_path / 'copy'), 64, 90, workers=0) == 0
    return [source, str(tmp_path / 'copy'), '--max-side', '80'], '--max-side'


def case_dest_holding_other_files(tmp_path):
    os.makedirs(tmp_path / 'copy')
    (tmp_path / 'copy' / 'mine.txt').write_text('not a copy')
    return [make_source(tmp_path), str(tmp_path / 'copy')], 'DEST'


BAD_INPUTS = {
    'DEST equal to SOURCE': case_dest_is_source,
    'DEST inside SOURCE': case_dest_inside_source,
    'SOURCE inside DEST': case_source_inside_dest,
    'SOURCE missing': case_source_missing,
    'SOURCE without train or val': case_source_without_splits,
    'SOURCE without class folders': case_source_without_class_folders,
    'a class folder without images': case_class_folder_without_images,
    '--max-side 0': flag_case('--max-side', '0'),
    '--max-side -5': flag_case('--max-side', '-5'),
    '--max-side not a number': flag_case('--max-side', 'big'),
    '--quality 0': flag_case('--quality', '0'),
    '--quality 101': flag_case('--quality', '101'),
    '--workers -1': flag_case('--workers', '-1'),
    'DEST written with another --max-side': case_dest_of_other_settings,
    'DEST holding other files': case_dest_holding_other_files,
}


@pytest.mark.parametrize('case', BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_refused_in_one_line_naming_the_flag_with_exit_2_before_anything_is_written(
        case, tmp_path, capsys):
    argv, flag = BAD_INPUTS[case](tmp_path)
    before = tree(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        shrink_dataset.main(argv + ['--workers', '0'] if '--workers' not in argv else argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2
    shown = lines(captured.out + captured.err)
    assert len(shown) == 1, shown
    assert flag in shown[0], shown[0]
    assert tree(tmp_path) == before


def write_big_source(root, classes=4, per_class=100):
    """`classes` x `per_class` links to one 3000x2250 JPEG: each file costs a worker tens of milliseconds (so a
    run lasts past its first progress line, shown after 2 s), and the files take the disk space of one."""
    first = os.path.join(root, 'train', 'c0', '0.jpg')
    os.makedirs(os.path.dirname(first))
    picture(3000, 2250).save(first, quality=90)
    for c in range(classes):
        os.makedirs(os.path.join(root, 'train', f'c{c}'), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, 'train', f'c{c}', f'{i}.jpg')
            if not os.path.exists(path):
                os.link(first, path)
    return classes * per_class


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_stop_signal_to_a_run_with_2_workers_leaves_no_partial_file_and_the_rerun_finishes_the_rest(
        tmp_path, signum):
    source, dest = str(tmp_path / 'source'), str(tmp_path / 'copy')
    total = write_big_source(source)
    command = ['shrink_dataset.py', source, dest, '--max-side', '128', '--quality', '90', '--workers', '2']
    proc = start_process(command)
    try:
        read_until(proc, r'^Shrinking .* files')
        os.killpg(proc.pid, signum)  # to the whole process group, as a scheduler or Ctrl-C sends it
        rest = proc.stdout.read()
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert status == 128 + signum, rest
    stopped = [line for line in lines(rest) if 'stopped by' in line]
    assert len(stopped) == 1 and stopped[0].startswith(f'stopped by {signal.Signals(signum).name}: '), rest
    assert 'Traceback' not in rest
    names = [os.path.join(top, name) for top, _, files in os.walk(dest) for name in files]
    assert not [path for path in names if output_folder.TEMP_FILE.match(os.path.basename(path))]
    done = [path for path in names if path.endswith('.jpg')]
    assert 0 < len(done) < total
    for path in done:  # every file under a final name is whole
        with Image.open(path) as image:
            image.load()
            assert max(image.size) == 128
    kept = {path: os.stat(path).st_mtime_ns for path in done}

    rerun = run_script(command)
    assert rerun.returncode == 0, rerun.stderr
    assert f'{total - len(done):,} files written, {len(done):,} skipped as already there, 0 unreadable' in rerun.stdout
    assert {path: os.stat(path).st_mtime_ns for path in done} == kept
    assert sum(len(files) for _, _, files in os.walk(os.path.join(dest, 'train'))) == total

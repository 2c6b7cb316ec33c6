"""`latentseg serve`: the page's handler on good and bad uploads, and an end-to-end run in headless
Chromium (skipped where Chromium, ChromeDriver or Selenium are missing; `.ci/run` installs them)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from latentseg.data.io import read_label
from latentseg.errors import LatentSegError
from latentseg.infer import predict
from latentseg.serve import Result, checked_upload, class_sizes, render, safe_stem, segment_file

pytest.importorskip("gradio")


@pytest.fixture()
def uploads(tmp_path):
    """A stand-in for Gradio's upload folder."""
    root = tmp_path / "gradio"
    root.mkdir()
    return root


def upload(uploads, source, name=None):
    target = uploads / "abc123" / (name or source.name)
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(source, target)
    return target


def test_segment_file_matches_predict(model2d, data2d, uploads, tmp_path):
    case = data2d["test"] / "images" / "phantom_000.png"
    sample = {"steps": 2, "num_samples": 2}
    result = segment_file(model2d, upload(uploads, case), tmp_path / "dl", sample=sample, seed=3, upload_folder=uploads)
    predict(model2d, case.parent, tmp_path / "ref", sample, seed=3, overlays=False, progress=False)
    expected, _ = read_label(tmp_path / "ref" / "phantom_000.png")
    assert np.array_equal(read_label(result.download)[0], expected)
    assert np.array_equal(result.label, expected) and result.download.name == "phantom_000_label.png"
    overlay, heat = render(result)
    assert overlay.shape == (64, 64, 3) and heat.shape == (64, 64, 3) and overlay.dtype == np.uint8
    sizes = class_sizes(result)
    assert [row[1] for row in sizes] == [int((expected == v).sum()) for v in np.unique(expected) if v]
    assert not list(tmp_path.glob("latentseg-serve-*"))  # the work folder is gone


def test_3d_render_takes_any_slice():
    label = np.zeros((4, 5, 6), dtype=np.int64)
    label[1, 1, 2] = 2
    result = Result(np.random.rand(1, 4, 5, 6), label, np.random.rand(4, 5, 6), (1.0, 1.0, 2.0), None, {2: "lesion"})
    overlay, _ = render(result, 2)
    assert overlay.shape == (4, 5, 3) and not np.array_equal(overlay, render(result, 3)[0])
    assert class_sizes(result) == [["lesion", 1, 2.0]]  # voxels and mm^3


def test_bad_uploads_are_refused_with_a_message(model2d, data3d, uploads, tmp_path):
    dl = tmp_path / "dl"
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(LatentSegError, match="notes.png"):
        segment_file(model2d, upload(uploads, text), dl, upload_folder=uploads)
    other = tmp_path / "report.pdf"
    other.write_bytes(b"%PDF-1.4")
    with pytest.raises(LatentSegError, match="not a 2D image, NIfTI, MetaImage or NRRD file"):
        segment_file(model2d, upload(uploads, other), dl, upload_folder=uploads)
    volume = next((data3d["test"] / "imagesTr").glob("*.nii.gz"))
    with pytest.raises(LatentSegError, match="a 3D input given to a 2D model") as err:
        segment_file(model2d, upload(uploads, volume), dl, upload_folder=uploads)
    assert "latentseg-serve-" not in str(err.value)  # the server's paths stay private
    big = tmp_path / "big.png"
    big.write_bytes(b"0" * 2048)
    with pytest.raises(LatentSegError, match="over this server's limit of 0 MB"):
        segment_file(model2d, upload(uploads, big), dl, max_bytes=1024, upload_folder=uploads)
    with pytest.raises(LatentSegError, match="only files uploaded through this page"):
        checked_upload("/etc/passwd", 10**9, uploads)
    with pytest.raises(LatentSegError, match="only files uploaded through this page"):
        checked_upload(str(uploads / ".." / ".." / "etc" / "passwd"), 10**9, uploads)
    with pytest.raises(LatentSegError, match="upload an image"):
        checked_upload(None, 10**9, uploads)
    assert safe_stem("../../evil name.nii.gz") == "evil_name" and safe_stem("///.png") == "case"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("Chromium and ChromeDriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _start_server(model_dir) -> tuple[subprocess.Popen, int]:
    """`latentseg serve` as a user starts it, with its defaults, on a free port; waits for the page."""
    port = _free_port()
    cmd = [sys.executable, "-m", "latentseg", "serve", "--model", str(model_dir), "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"latentseg serve exited with {server.returncode}: {server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                if page.status == 200:
                    return server, port
        except OSError:
            time.sleep(1)
    server.kill()
    pytest.fail("latentseg serve did not answer within 180 s")


def test_page_in_a_real_browser(model2d, data2d, data3d, tmp_path):
    """Upload a phantom, segment it, see the overlay, download the mask: it equals `latentseg
    predict`'s for the same seed. A 3D volume given to this 2D model shows a message, and the page
    keeps working. Saves a screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    server, port = _start_server(model2d)
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(f"http://127.0.0.1:{port}/")
        file_input = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))

        def segment(path):
            file_input.send_keys(str(path))
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"#upload td[aria-label='{path.name}']")))
            time.sleep(0.5)
            browser.find_element(By.ID, "segment").click()

        volume = next((data3d["test"] / "imagesTr").glob("*.nii.gz"))
        segment(volume)
        wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "a 3D input given to a 2D model"))
        browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
        file_input = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))
        case = data2d["test"] / "images" / "phantom_001.png"
        segment(case)
        wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "Done."))
        overlay = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#overlay img")))
        assert overlay.get_attribute("src")
        link = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#download a.download-link[href]")))
        assert link.get_attribute("href").endswith("phantom_001_label.png")
        downloaded = tmp_path / "downloaded.png"
        downloaded.write_bytes(urllib.request.urlopen(link.get_attribute("href"), timeout=30).read())
        browser.save_screenshot(str(tmp_path / "serve.png"))
        assert (tmp_path / "serve.png").stat().st_size > 10_000
    finally:
        browser.quit()
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0 and "closing server" in output, output  # SIGTERM stops it cleanly
    predict(model2d, case.parent, tmp_path / "ref", seed=0, overlays=False, progress=False)
    assert np.array_equal(read_label(downloaded)[0], read_label(tmp_path / "ref" / case.name)[0])


def test_jpeg_and_metaimage_uploads_come_back_in_the_formats_predict_writes(
    model2d, model3d, data2d, data3d, uploads, tmp_path
):
    """A JPEG's label map is a PNG (JPEG would blur the labels) and an .mha's an .mha."""
    from PIL import Image

    grey = np.asarray(Image.open(data2d["test"] / "images" / "phantom_000.png"))
    Image.fromarray(grey).save(tmp_path / "scan.jpg", quality=95)
    result = segment_file(model2d, upload(uploads, tmp_path / "scan.jpg"), tmp_path / "dl", upload_folder=uploads)
    assert result.download.name == "scan_label.png" and result.label.shape == grey.shape
    sitk = pytest.importorskip("SimpleITK")
    volume = next((data3d["test"] / "imagesTr").glob("*.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(volume)), str(tmp_path / "ct.mha"))
    result = segment_file(model3d, upload(uploads, tmp_path / "ct.mha"), tmp_path / "dl", upload_folder=uploads)
    assert result.download.name == "ct_label.mha" and read_label(result.download)[0].shape == result.label.shape

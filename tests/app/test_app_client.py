"""The launched app through its API, with ``gradio_client`` (and plain HTTP where the client checks first)."""

import time
import zipfile

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from PIL import Image

from x2edit.app.ui import LORA_HEADERS
from x2edit.retrieval.index import read_index, search

EDIT_PARAMETERS = ["image", "instruction", "task", "steps", "guidance", "seed", "random_seed", "base", "adapter",
                   "loras", "fusion", "mode", "caption"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def output_files(editor) -> set:
    return {p for p in editor.output_dir.iterdir() if p.is_file()}


def test_api_names_and_signature_are_stable(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/edit", "/edit_batch", "/classify", "/search_loras"} <= set(api)
    edit = api["/edit"]["parameters"]
    assert [p["parameter_name"] for p in edit] == EDIT_PARAMETERS
    assert [p["parameter_name"] for p in edit if not p["parameter_has_default"]] == ["image", "instruction"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in edit}
    assert defaults["task"] == "auto" and defaults["steps"] == 1 and defaults["base"] == "x2edit-tiny"
    assert defaults["mode"] == "edit" and not defaults["caption"]  # appended last: older calls keep working
    assert [p["parameter_name"] for p in api["/edit_batch"]["parameters"]] == ["files", *EDIT_PARAMETERS[1:]]


def test_edit_round_trip_chains_and_keeps_the_history(served, example):
    client = Client(served[2], verbose=False)  # its own session: a history of its own
    (before, after), label, info, download, gallery, seed = client.predict(
        handle_file(example), "please paint the plus sign bubblegum-pink", api_name="/edit")
    assert np.array_equal(pixels(before), pixels(example)) and Image.open(after).format == "PNG"
    assert np.array_equal(pixels(download), pixels(after)) and seed == 0
    classified = client.predict("please paint the plus sign bubblegum-pink", api_name="/classify")
    assert label["label"] == classified["label"] and f"`{label['label']}` (classifier" in info
    assert len(gallery) == 1 and np.array_equal(pixels(gallery[0]["image"]), pixels(after))

    # the result as the next input ("use as input"), then the history holds both edits in order
    (before2, after2), _, _, _, gallery, _ = client.predict(handle_file(after), "zoom in", "camera_move",
                                                            api_name="/edit")
    assert np.array_equal(pixels(before2), pixels(after))
    assert [g["caption"] for g in gallery] == [f"1. {label['label']}: please paint the plus sign bubblegum-pink",
                                               "2. camera_move: zoom in"]
    assert np.array_equal(pixels(gallery[1]["image"]), pixels(after2))


def test_task_override_changes_the_route_and_the_result(client, example):
    auto = client.predict(handle_file(example), "please paint the plus sign bubblegum-pink", api_name="/edit")
    forced = client.predict(handle_file(example), "please paint the plus sign bubblegum-pink", "tone_transform",
                            api_name="/edit")
    assert forced[1]["label"] == "tone_transform" and "(chosen by you)" in forced[2]
    assert auto[1]["label"] != "tone_transform"
    assert np.abs(pixels(forced[0][1]) - pixels(auto[0][1])).max() > 0


def test_progress_updates_reach_the_client(client, example):
    job = client.submit(handle_file(example), "zoom in", api_name="/edit")
    seen = set()
    while not job.done():
        status = job.status()
        seen.update(unit.desc for unit in status.progress_data or [])
        time.sleep(0.002)
    job.result()
    # the handler's progress, sent while the transformer runs: "editing", then "step i/n" from the denoising loop.
    # A one-step edit can pass "editing" between two polls, so either update proves it reached the client.
    assert seen & {"editing", "step 1/1"}, seen


def test_oversized_upload_is_refused_before_the_handler(served, client, noise_png):
    demo, editor, url = served
    before = output_files(editor)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client checks the app's limit
        client.predict(handle_file(noise_png), "zoom in", api_name="/edit")
    # and the server refuses it whatever the client does
    response = httpx.post(url + "gradio_api/upload", files={"files": ("noise.png", noise_png.read_bytes())})
    assert response.status_code == 413
    assert output_files(editor) == before


def test_corrupt_upload_and_empty_instruction_are_explained(client, example, corrupt_png):
    with pytest.raises(AppError, match="broken.png is (corrupt or truncated|not an image PIL can read)") as e:
        client.predict(handle_file(corrupt_png), "zoom in", api_name="/edit")
    assert "Traceback" not in str(e.value)
    with pytest.raises(AppError, match="the instruction is empty: say what to change"):
        client.predict(handle_file(example), "  ", api_name="/edit")


def test_serves_this_machine_only_and_no_share_link(served):
    import argparse

    from x2edit.cli.app import add_arguments

    demo, editor, url = served
    assert url.startswith("http://127.0.0.1:") and demo.share is False and demo.share_url is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    assert defaults.host == "127.0.0.1" and defaults.max_file_size == "20mb"


def test_files_outside_the_app_folders_are_not_read_or_served(served):
    demo, editor, url = served
    assert httpx.get(url + "gradio_api/file=/etc/passwd").status_code == 403
    before = output_files(editor)
    body = {"data": [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, "zoom in"]}
    event = httpx.post(url + "gradio_api/call/edit", json=body).json()["event_id"]
    assert "event: error" in httpx.get(url + f"gradio_api/call/edit/{event}", timeout=30).text
    assert output_files(editor) == before


def test_lora_search_and_edit_with_a_picked_lora(client, example, lora_index):
    rows = client.predict("a night scene", "", api_name="/search_loras")
    assert rows["headers"] == LORA_HEADERS
    expected = search(lora_index, "a night scene", k=5)
    assert [r[4] for r in rows["data"]] == [h["file"] for h in expected]
    assert sorted(r[2] for r in rows["data"]) == sorted(r["title"] for r in read_index(lora_index)[0])  # header titles
    assert [r[0] for r in rows["data"]] == [False] * 3  # nothing picked until the user ticks it

    picked = {"headers": LORA_HEADERS, "data": [[True, 1.0, *rows["data"][0][2:]]]}
    plain = client.predict(handle_file(example), "zoom in", api_name="/edit")
    fused = client.predict(handle_file(example), "zoom in", loras=picked, fusion="average", api_name="/edit")
    assert np.abs(pixels(fused[0][1]) - pixels(plain[0][1])).max() > 0
    assert "**LoRAs** (average)" in fused[2]

    stranger = {"headers": LORA_HEADERS, "data": [[True, 1.0, "x", 0.0, "/etc/passwd"]]}
    with pytest.raises(AppError, match="is not a LoRA of this app's index"):
        client.predict(handle_file(example), "zoom in", loras=stranger, api_name="/edit")


def test_a_full_queue_is_refused_with_a_message(served, example):
    client = Client(served[2], verbose=False)
    batch = [handle_file(example)] * 8
    jobs = [client.submit(batch, "zoom in", api_name="/edit_batch") for _ in range(4)]  # 1 runs, 2 wait, 1 more
    outcomes = []
    for job in jobs:
        try:
            results, archive, _ = job.result(timeout=120)
            with zipfile.ZipFile(archive) as z:  # every image of the batch, edited, in the zip
                assert len(results) == 8 and len(z.namelist()) == 8
            outcomes.append("done")
        except QueueError as e:
            outcomes.append(str(e))
    assert outcomes.count("done") == 3 and "Queue is full! Please try again." in outcomes

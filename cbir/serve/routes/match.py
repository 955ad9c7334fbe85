"""POST /match: two images (uploads or gallery names) matched with local features: inliers, the fitted model and an
overlay PNG (the page's "why?")."""

# no `from __future__ import annotations`: FastAPI reads the route annotations
import base64
import time
from typing import Optional, Tuple

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response

from ...errors import DecodeError
from ..deps import LoadedDep, ServiceDep, deadline_left, decode_upload, gallery_path, gallery_row, only_files, read_upload
from ..errors import ApiError, clip
from ..render import overlay_png

router = APIRouter()
SUMMARY_KEYS = ("features", "matcher", "model", "image_size0", "image_size1", "n_keypoints0", "n_keypoints1", "n_matches",
                "n_inliers", "model_matrix")


def side_image(request: Request, loaded, upload, name: Optional[str], i: int, side: int) -> Tuple[np.ndarray, str]:
    """Image ``i`` of a match, from its file field or its gallery name (exactly one), decoded at ``side``."""
    from ...data import decode_image

    given = upload is not None and hasattr(upload, "read")
    if given == (name is not None):
        raise ApiError(400 if given else 422, f"image {i}: give either a file field image{i} or a gallery name name{i}, "
                                              f"not {'both' if given else 'neither'}")
    if name is not None:
        row = gallery_row(loaded, name)
        try:
            return decode_image(gallery_path(loaded, row), max_side=side), name
        except DecodeError as e:
            raise ApiError(404 if "not found" in e.cause else 500, f"gallery image {clip(name)!r}: {e.cause}") from None
    data, label = read_upload(upload, f"image{i}", request)
    return decode_upload(data, label, side), upload.filename or f"image{i}"


@router.post("/match", summary="match two images with local features: inliers, the fitted model and an overlay PNG",
             dependencies=[Depends(only_files("image0", "image1"))])
def match(request: Request, service: ServiceDep, loaded: LoadedDep,
          image0: Optional[UploadFile] = File(None, description="first image (or name0)"),
          image1: Optional[UploadFile] = File(None, description="second image (or name1)"),
          name0: Optional[str] = Query(None, description="a gallery image as the first image"),
          name1: Optional[str] = Query(None, description="a gallery image as the second image"),
          model: str = Query("homography", pattern="^(homography|affine|fundamental)$"),
          format: str = Query("json", pattern="^(json|png)$", description="png: the overlay itself"),
          with_matches: bool = Query(False, description="include the matched points and inlier flags")):
    t0 = time.perf_counter()
    side = service.cfg.match_side
    img0, n0 = side_image(request, loaded, image0, name0, 0, side)
    img1, n1 = side_image(request, loaded, image1, name1, 1, side)
    t_dec = time.perf_counter() - t0

    def work():
        from ...local.pair import match_images

        feats, matcher = service.matcher()
        with service.match_lock:
            return match_images(img0, img1, features=feats, matcher=matcher, model=model, max_side=None)

    res = service.gate.run(work, deadline_left(request), "matching")
    png = overlay_png(img0, img1, res)
    if format == "png":
        return Response(png, media_type="image/png", headers={"x-inliers": str(res["n_inliers"]), "x-matches": str(res["n_matches"])})
    out = {k: res[k] for k in SUMMARY_KEYS}
    out.update({"image0": n0, "image1": n1, "seconds": {**res["seconds"], "decode": round(t_dec, 4),
                                                         "total": round(time.perf_counter() - t0, 4)},
                "overlay": "data:image/png;base64," + base64.b64encode(png).decode("ascii")})
    if with_matches:
        out.update({k: res[k] for k in ("mkpts0", "mkpts1", "inliers")})
    return out

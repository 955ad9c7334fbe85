"""Compact local features: a fixed linear projection of the descriptors and the storage dtypes of ``local.h5``.

Stored features stay in hloc's layout and readable with plain h5py; only the dtypes shrink:

* ``descriptors`` ``float16`` (unit rows; with a projection, ``dim`` columns instead of the extractor's 128),
* ``keypoints``  ``uint16`` pixel coordinates rounded to the nearest pixel centre (at most 0.5 px off; an image
  wider or taller than 65,535 px keeps ``float32``),
* ``scores``     ``float16``; ``image_size`` stays ``int64``.

:func:`compact` applies exactly this rounding in memory, so a query extracted at query time is matched with the same
values a gallery image has on disk.

**Projection.** RootSIFT's 128 dimensions are redundant: the top principal directions of raw (uncentred) RootSIFT
keep most of the dot products a nearest-neighbour matcher compares. :data:`BASES` ships one basis, learned by
:func:`learn_basis` from RootSIFT of the 12 photos that ship inside scikit-image (``cbir.demo.PHOTOS``; public
domain / CC0 pictures, no download) at full size and at 512 px: 19,918 descriptors, the first 24 directions hold
92.7% of the energy. A basis that depends on no gallery keeps every index comparable with every query. Measured on
ukbench56 (benchmarks/rerank.py) the 24-d projection re-ranks as well as the 128-d float16 descriptors (mAP 0.985 both)
at 15.1 instead of 68 KB per image; an index records the basis's name and SHA-256, and a basis is never changed under
an existing name.
Regenerate with ``python -m cbir.local.compact`` (prints the encoded basis).
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..errors import CbirError
from ..vectors import l2n

#: storage of the legacy layout (float32 everywhere) and of the compact one
STORAGE_FLOAT32: Dict[str, str] = {"descriptors": "float32", "keypoints": "float32", "scores": "float32"}
STORAGE_COMPACT: Dict[str, str] = {"descriptors": "float16", "keypoints": "uint16", "scores": "float16"}
_ALLOWED = {"descriptors": ("float32", "float16"), "keypoints": ("float32", "uint16"), "scores": ("float32", "float16")}
UINT16_MAX = 65535

#: name -> (source features, input dimension, stored columns, base64 of the float16 matrix (in_dim x columns))
BASES: Dict[str, Dict[str, Any]] = {
    "rootsift-skimage12": {
        "features": ("rootsift", "sift"),
        "in_dim": 128,
        "columns": 32,
        "data": (
            "eS11IA0qLTBvpqahfisMsZKkAyxAKTU0iLD+qmwo4CXSJmYoPirnspitMy9drDKtaKa8qg8xyizcJ5WU+ScWJ1wszqBApO0rCrHj"
            "qXssLaelJWkxvihxLPuWELFwqx2o3Kt/pncyC6KzLMAxQK5lrWibLzAaHLmomyHbKySZYaqKK12km6qak3yx6KwtJxQr1ivVLGIn"
            "ya1sL3+teK7TLkewoKWaLYUvrCwLL3AZJLBrIMyodLFnsU6yKRhFnfOuQyy4qTys8SGrqIusmKxvMNcpcas1IZKoTDHHqEkptTCp"
            "sPufTa3bL3GvLiaDpDSw/KtosR4pjrC5sy4qr6QUsg8tVa00rYQpITAFJuWw5jEjqt2oCq5rLikvqqlbMTWlRpJRpj6eRy4NsEOu"
            "dbAvq7muIiYuM0MixK1kJ+Oco7EgK0+pQKxrqHYrii3Tq8oosKoDIZ6weiSUIuOmTCp0rPMwxStLL0QskC1dsTew6qpEKOAsSCM2"
            "J8ikg6SPoIUu6imAGe2o0qzunQoqW5UsrGkgM6tTsDKlU6pLHAmt/CRiMgMwFSR2oJctt7Abq0Ou+yoKqievzKdiquqtMbHCMP8r"
            "ACgfEUClTBgVIKclD7HDH6+tNqzQLdOvZym6rIYu1DD/L5GtlbGercuoVapZr28QKbDgqEyqHa07qkOveCyKMMGpaDLPMwwnY6TG"
            "nm4rabIZKzCsvC2lsC6p5jDlqCkswjASrEmkrybmrD0ww7CjJg2t3DACJLOvtCy1KQSmyi16q+Wely6xsQ6s0SusLEmqwTPmrMMo"
            "0KUbr/ir9rHPqXsqUCvoKS8kdyg1quSwQC2NMKUvLbDApFYvhbDKL+crjKl/rXGlbbEqrpkofCqqLSMv9yZ4qv0s0SJfsKMpLLDK"
            "pHoqwSgtrQUpSihssLQuzyK1rwOwdqwJKJsqMjAgLGysj69jp5mjg63On+EkvS8nqTcueyRhMDwlWCljMbSxv6lIlsaoTawALaks"
            "z6/5JzewSauBp5ufES84KdAk4SwOrliwmJ3fMNIjfqifqdssN6k8K/AvgTC0rE8zUCy6qBOvqS3HqgAx+iqMpe+tv6+yqu4seCmc"
            "KGIxnaoKr8UrSRnOrYurLizmLtqmha18Ki2Ui6wOKGgo0ayWLGCpPDE7qzYwxYE9MuKsUK2jrTSw/CiwI5cmIayiLKupeCkALNsu"
            "TKgwrryV4y1vq3uusSo+rSCwCqrXqTekla9tI3QxaqVyJpmkQSIksFaqFq0Qr3QqFKsJpw+uDafwre4lUi6kLhMv3Z83KWwoEq0n"
            "qmusebHwq1yjXLD+LH+qUjFhMHcut6vMqp6wd6/YKO2v5K1qHRKuHK6LsE4tyjCWrqowTrKEMUUtxC/eqOsoD6yFsherCq5/sNot"
            "MCrXMU0sqqBYrJujeyStMGqlVqkrsLas667SsEYtsSxUME+q1xdRLc6uVqj0KZWuqKtHJzKkSKzuMY6vk6hZK4kwHKcDsaWdoK6Z"
            "r46hiKEEr3muQrCJpgOstSdZsGwxzTAZsU8svCqhphqtwh9WsJethBx3KOQpBC9VKUkhHKAoMm+uX6C3rKQk1qZdqder5K+io2ew"
            "NS1WIq8nV6xuLzogQzDnLQQrl572rT0r3qklrngiNyWDLKYiPzFpJVeqtytGKIUrxa7OMV0oSa52p7assit7sDcwtCa2pXMs5Cyc"
            "KngtOSyQLAYovK6CL1MtEKGaKhCf3y0XKKMxEiOCrLWx8TBDqeooPDKkKeOtPiNoKwUxorAOKL+pmKkkLYeoqzBQIyQugCwtMCKs"
            "XKIjKeQu/RxCoV4v/Cg0nDgkIq1PscUnYq9XL3ujxSAvKaIeRCxGMJGu0LBUrI0pz6grrb4v0S7QMeMsiTBwJh2xGxm/LsOnVSbB"
            "LHGuUKK0KmurOqqVrzeoCSsCq8Ar3y91qr+iRSt4rCWxLSpxLfyv8Csxpxsq1SYUL8OhHDG1sJYtbCcXpP8kPK0StMQsX6mCJFkq"
            "RKg8Mn0mcSkyMXMtGKa5K++p9q/dr4YxKbBvqygsTi13Mwargi2nrzgmRSTaKLEdW6/GrzqqG6mFL8axLzGppgElbq20LESgRSxV"
            "swmowzCWsG6tia4SrFSrYzDQqM4K+S4DMzkr5KiNqWsouqtfoXescp5Upa8u9Scjq2ktTTErpQ6v6y2Tq4etSrAzKg6hfq8cryiw"
            "lLAjJkqqCS5SqSMxdSjJKRYYm6qXJ76tU6uSo7IqlJZuLKYnoJKtouwzPqfkHNqkcSZnph6p9y/wsIytya5FqoWc9yvRqe4uUa14"
            "MpasByuzINCqoSzeotSuOC2SKiWmMqDzKbOp/axQMfUpcywgrpMwcShGofIpMrLgsKesGijyLtKq+S2ELW0oyiiHqQMtMyaRqewt"
            "uS9tqd4zsSqzooQflCP1rQSvHKxTMI4j96cTMP6kJS5lsHelobAFrmseFacts/gszi6fMU6ukyq3LBUsCCFWrSIr5CzxMPosiCkH"
            "KOSULSx0rhCv8SkGrm0rW5xmqyw0sq5hLYkpwq+vrnCysq5osEox/y5Am88uWCzdKHMsI7Lfo6osOCOWLGkpsa3ELdcwXqq4qJ6t"
            "waqhKQEqQS6NMsulUijiLrGuIqxqqIMvIrK3MdSibq0ml+4sRqoYLSGw4h75JzKtc6gLo5OxdTHAnRIsgqf+rI0knCEBL2IzdKjU"
            "qSIwqqVwrYyk1zHmK8iccSgMLS4qZjAgL+styivWMHKomCKhl5eyNKLFJ50o3DPJrTKi6ibRLAepNK7YJPWvFK1WLTyv1aaRqFql"
            "/Cz1qTohVq30oAKvvCxDI7mhzSdIsO2pGCy/rdouKC2xJDktZSm2sLwpMyuyLZSsbjNppHotEqTzsC0nOK6AKverzSvdK7mtD6uR"
            "sd8rt6QXq3CoFrGKrpkpXCRQMaGi0aQlrTowbK+cGDsx1C7Mm9QtZizNL1OvqqVGpQKtS68grrAuh635ri2uiKnfLG6rQK5Gmpap"
            "CLBArK8w2zD7r+Kou6H+ML2q9CzSMPgoVSYGsIAs76zhrYMZsKkpq2awKC8vIZqtyq7NrdkuJi7mrgSwuCo6LySbrbHDM2WoiaGZ"
            "rhww6il0qEQtQaoPICIkpITOKQKy+6iDrbGhg56ELmkvwagyqIOwuigfKFwsC6xprYmm2iZYL1uszS0asXMuZLBAo+GryqeTqxKs"
            "VCdSMKYxMSiGIq2YGKwcqpkxsSiErTwlcavgqDAwraGhKsOk8KhbrIqoQC3WJPSqZK+oJBuwLax6rFkcZ7D0JZ0cXzK8Exgj9Cyq"
            "LEuhHK+cMcWtTavToUyt0KF0rpqspCxcKk4cgqA8pJ0pqCS3seasQqprrGYrh67yKmSw3y1KqVQtH7GlrX6sBzD2rGqvxiw+rcAo"
            "bK+VroKkkLBcrmYymi7/MaUxWqJSJYOuNi8crRUeY5qKqMogoKqBKpwkCK3QqaGl6iL4LrOgOTApqvEl7Rs6J9Kid6NrsH4lYSMX"
            "L/geTh/RKB2xEK0oKg8jVComLiOtGJyqrC2xb6hFq58r6qaLLRSalKXHqPspspVzr4UyzirhKZKw1qd+jaKpYyylqDOtway2sHOw"
            "4yy2qXMxEyQJqnipBKx7qe2tjCx3L5mpwiiJquCvzK26LmQZb6v5KhWlszIksGOmRyl8Jj4tga3nsO6sYyK+sGAp0a60MbeuIZ0c"
            "KhuqlykhKNEvwCnhrG2sE7AgreSm0DAwo+kVHKhuKBMtuy0RodSpcihrLmWvKbKPp/UxqSO1pXew5yaxn52jmDA7JhYrLDBOnBGp"
            "Eq9gJBmpny7xpZssA6oVK+UtDBqXsSUrC6gHrW6s4ixEIN+vnqpoKzQx5aolr86seC32rnOoZi2aKLUlT6y4qJ2oKy2vKbwtN6sg"
            "pvKsyS/iKrqqAY+urv8oQKCZpWcsJjDiqqeraKmFMByuka19qIOcy7BTsJgtPCrorpqfS64YqgGpoJozpy6fr6vJqs4snhz3pNIv"
            "FiavLtCwgaqtL8UxDS1BKbSogCwksQcmA6yFrI+ryKwfKNYsmawNL46uDqrnrDehIq1DJaGn0KyFLJiMwaQSqmMm4jBCqbyrUzKx"
            "sT0xlqzzLKCoUzCXqAisH6GtqvaonqBnpqEr/aEVqQ6viaRPKcIqOKUfMjKpjCwuItyhRihgIX+x0KOIIQEv9K7CFe+sc6yxrT0v"
            "J6wsqXErVK/RpPSqpyumqvGvXixYsA+tti20sNOliDCdmvKvHy/Anhqj0xnGLA6h5qjAK2CbA6uNpySvv7ApKGmgex1tHgqesShM"
            "sCUwjKyWos8tCKmFn/AsVq7pqSYuNaDNrYss8SvCLxqorirxLxKlwyw2LF6uXCtgpk2x/qCiqMmiTa2DLgykMLHnLFkqfiT/jocs"
            "6SqMKPmSdK3qLXSkQKpCLXkn9CgAKwellqQ4rLQuoTG+sFsxvy4DmCOrK6tqJ5UigDBnsCioRqvwLdeo3SWWKvuccKqyKs6nuDC7"
            "qMgeiC5LrJOwCp43sF2owazPLbEyXq7WKJ4kljF2rpMiPC92LusX/6xGLN8aUhVCrW2a3KxErRqu6ilHKBonDKu/pBmoaqNvKzmq"
            "5R/ZMNouVy3MMXueqq/lqTUx6K06K2svHiCMpEAfISwgK2WtV6xJsJ6v36fJrbYikaptrISpfSqTqFsu8jHDLlIpGamyHwowGiiE"
            "L4KxLyXELEWmeytIItWtwCy8oLAsnCgXpjwpYbAerOQsbqnulGMfn6mMrZkw2ywvJlYs6C+hJVmlVh31LviwgihgqHIhBZQ5rkyw"
            "bKjelLIxprGCLjyrXJdlsfcrkyEBHUmvUrGULXepSqc0oZWqpaqIqDglErHCqK8sOyw6quOg3x6NrIOrdKwPoaatViv3LDSoPC6m"
            "MN+rS6+gMvmrf6zrHt6lgTCKnJ2s3LEnrTSrzqyfLpCqlCj+qaEqUiAhpDoThK2vr9agXSs0r02mxCifKgwlgTPzqlemSC8LoAYs"
            "fy1tML0p0ohZqfCxV6Q1LKSdLSyjpYgrr6mfLLIp/qfzIswjbbFIMCQsS7AVsKwpr6YuqHcxV6MdIWepciqDMWAtOizDqiCvLyYg"
            "rmkt4iqEKPEo5avZrcor6C6sL46pqiXIMb+l4DSxLDag6aU9JACxBKxRprQs+539q/OnlaQIK+yvFikrsdCmLiZGK9+vXyZuK3qx"
            "NamcI74t6i4NoJuvMCzvMCMxpy90MPMuGSF6Kf6tSKW+LOas56bZqYKxfi0Nn5koVqqdrUcdD7FMrnQuTy2XrcMwp6mCLHAobCnk"
            "se2pRzCtICEvjzDeJAEvPjENrR0meZlkrnWtQi5opWEjAi/8r52XLqy5LDCwJS+LLkMt36KlqTywSi0vqtcrRbBMqFYsaK1Nkqws"
            "taxKMyEmiKE1qAOiCq/irg4xdy+frXWnhKxsq52naTBSKAovzSYtEmaka6zfFRQv9i3eK8swu6hSKDagdbLQIjAdJifMM0wt1ier"
            "nxssja30rbOcWC5HrqCnR7CoKlOXCKRDrfejqh4sr7qlhSp1LPcqASFIoI2mUqYwGjOxbC10Kiat0yvlLDcoFTCwJAYtQqbOMekt"
            "Uax+qwuw2y2yMGat76xLrFEvlaVYKSGwcypforWniqyoqHqtYSIXq2cvAqdPsMSqeSzVn2YuESRrMY4vmyl3KTwteqj1q70lVzLu"
            "rvQpm6RlLJqoLyzgqFssj6vnrAWn6Sd/sH2sCS2yMCKwlLDpI3IqV51UJOiciS5FMKewQZyxKFos9am5o3kx8STgLRGliSm1qeek"
            "xTAdLt+u2q9nKgwvVqmdsZUzLSEopWuuTTAirEioEK5zqMOZpCQxn0WsIrGCLGOr5CnnoTUuCa8tJ8snirCcpTEq6ywFrMauv5gX"
            "qh8u/avfMFmxQS5TqJCoCbD1rkKury6GpOkn0jFergesmyUIKL4sJKqasJ+u4i0uKn+uhi4brwIslKUurAGo5bDuLfUqYCVvsawg"
            "HqIjrr2pgLAlqaYxzKuhL0GoxKjYL7wt4ykLI6SuU7CyMLssySvYrcapM6/VLEohsaQkKPOvGCywLGauhK4MrOsnuyzeKL6uPK2O"
            "L2GvVS28su4qXSsBLn6vaaNCsPIosS5gJM6oFK9nrIknaDKoLhkyjjEToxGojq5yL7QrOZYqnEKnRSIoqTuq4iZplSOul5ZHpgww"
            "bamFL4sl2yhJHmOmoiDEJuKwSiRHKqIv1jFBLTYpZKkDrVuxzyQ4Kroqo6vgqw6swyAKLmMtxCMsr0gtSqBOq2ohfKnIKqcuGCC2"
            "IsaqfKfmMLgg1xdcLEow1Klgq2mpdLASrgKvoSnqn0uwxa9vr3Sphy60oioob64kIdWSYaT9KGarWSVvLXkcxiwJL96g+y0cLNiu"
            "1iwdIzyvYKqjKw6xY6o7sEEt+60srdukTa/riqCmq6V2FSGmea7NpY8uhi6CJWUkSi9YJgYpyZtOMLko+ZgGrGQuWq8nshOo5TGJ"
            "j/alc7ClpIkkHRF7MJmrgixirQ8gtK0arhGlFCtlLgMoNC4tJU0sQi5OrAqxlxzTqi8o9qhILfKtTbHUrFwi7zDyKAOudrGdLiyk"
            "pyR5JJwrox+rLDau1KiiLUUtGa9FrcYwlSb3Jy+fL476Leivz6cfLzMqXiwDqdetTqyNsFQw/CyeqC2xTaUgrAysmS2Sp8gtZyrs"
            "rCMtdafdIJCwDZ6RMD8prqwiJf4u4jFqLSsfxaypIhcvxR0bHVop/LCCLAUqjyS4qZGuma3MoUgwAa/uofqoz6r9KeyuXIAapnMY"
            "NizeK46vIjFXpd8sJjGro5CpdqhXMquxQjHRrMssISkoMPKlAizwJJqqFKmYHFeWF6l+lwesVK4PpJSrZiyCrIwxGhIaLT8l6Saa"
            "JDSjtLEaI9siBTBbKDIvhLH+JCutp6V7Kxeo6C2QLJYdcayXmn4qfiycJRKwv61VKHEhLyuuqUwjIzGRLS0jCixAsJUkqiXtK0st"
            "3DFymf2ufqlMsWmtSya1r0Ok5pwwJB2uSaV/LgWtKaiCsQWo0CqQHbcs7qn7Iu4rL6hBmYsyP7AkKdcnrSXOLdYy0a2cKRAklLGJ"
            "rVyo2q5irjIqIa1GrDSoJZwvry2srasFKJYtoCgwqq8lsSkwGJipcihVK9gmZynKq3wUsi6fMciwWTHdLqUhE6vzqq6jjB97MHuw"
            "1ixyEtutJ6f5Kgkha6LGKgwrVKjnMLkpWSVzLSOdkbACKoSvfK4orsYssCs2r+Yqp6ReMa6k1x39JIItZisqo8kvBTFuHU8ojCtK"
            "Jk+nEaj3HMAoNi//JyepCS1ypKUqbKsqqQ8nNSm9KzOev6saqCevrDD7Jnog/RYZpMOnQyY/LLAwFDA+qDusaixsHueuea0GpRAu"
            "9yhGrcAryqVAL24agC01sFUhES8Mr64e9KyVrNIt1i7pq+krbayAr7+nYYbwKdosmLDOr5KgXB9bsBev16y6LzItXa60LuynJKg1"
            "FKIuTa7MrwQv7rBmKIOogiA1JMWuRbAfKmopTTK2sW+rXq2EpOqwfyUHKcKs0SsxsTSsjawZLIMdXajAKAiqCJxwsLeTMrAoLcSp"
            "MCoksJ+nx6uBrNYcKa0xLnwyTSkBKz+fdKBLrOIygaLisJEsH6lGL7GlsaTcLn2ZIK2SLXglHSHarWqyeyzdKHYpmbGhqUawHCWD"
            "LQCxnKKCLq8xbCyfKpEh0a+FL2OoyRNyn8cuvi7eKXIaiiyfsLOqHDB9rlGg7638qsotKi91l3yvVywLsZAx2yxxsPiuQyhjKV8s"
            "ASlTrIiw8KqArGUwq605KI+nHKtALDopb7AgMEkjCbASrIWu9C3rLrQv86lOJPUxXiTaNDotWigPIyMgtbDNKSYnVqypmuwhwqxh"
            "oVytA66tKu2wXCouKEIsvy8sqmmrSrEqpAOqmCxcKSupsB1/JCAxuS+DL1Ewxi+oHiyiJqkdMXgskyxlLKcpR6+hqOwsiS8Srlgh"
            "rq7nLH6sbSyUqe+soi9crKMqNx57pAyfvK1WL4ykIS3zLvgkqij4KJyucDHbL7icNqxIMKml1aiTMWKowKiXLJewEqANrjwkBa1E"
            "GkGrWqpdLJqqUho2HCStFSxGrTCkTy7wqTYv/qqgsG8rlC0PsLawxDBJKMSefSF4sIqsATBZrmGoI6SiryevuaeyrW+scC3jIEUq"
            "LDDJp34qLCrPsHgk2qYOKDY0FzFwKNWpKyAqp24mgacwMrCvDq6lrn8uVSiPqHCvXTDqrBqrRy1oMacrfSiqlBykNpy1IN8jYbDn"
            "mxYuLq2tLKQuPCwfLPYn/JjKMJUwYjGOsAsp4pniMJcq9rDYHl+hLirLrGUwUqDCKUQddKiprCuZm6oqlCGsz55XKoCwpKgnK6sh"
            "BCsCmpUAqzO+KTQsySkSMQ8p0SyxKkStWy/8pqUq8K6RMl+sGSsnqbirbqhnLIauxquhJqgqB6hvsP0k3KAamQut5qg/qTAy2K2/"
            "pCYtvzMuDDYmJyHxKgQoGiykJPKk4yiwFAwtOa0drTIp2S9Lq9KwujFqKPoaIa3ILpSvNKlAsiCRxKgOo3Uc9q7prAMw9awkLqOu"
            "bB0islAvui54KeGxgKlALIyphKy+IOOpTSkWrJEwHqwNKUIgS6itsPyucaxzMMksBLDQLxmxnqmZqliqZzExojuyZq4Yrd4zkSmj"
            "qhakmSv6o9qqHJpssR4swyhJK6qsR63hJrGszKnjsIEsYjDOLGisYayBrXEwt6pErLguTipAq5Yus7G7MoGhVRm3LGssvKBfowAs"
            "4bBOK2Asw6ieph6xzymLLfYtMLBSHu8mbhz+m7WyRyzVLi+s9bF0KiMp1DA2DH6o8p94JRkusDGPMKippDKfM/4lpCSto74sHjJe"
            "qsisNC5eMKwswbHYqtYsCC2mLIQh2ya7owkxTC84LEyuKLCML/wtKCwirKGjKC7jLt0upJ6mKCWoLa1/p04rJjHVrdCl/i09L7cs"
            "iC9HHW4wczBNKYGweSweLtcxTqo0qo4pbq49ME0u4rDFL8gr/y5iqLetew19rW6r+67NqbUscLAVrKsqUaaALjugL66MMFyRHylP"
            "n3kvEyh+Lz6uDxwMLB6k8y5KqTouByabK4Ydq60oq5osLq4Hp5KuNanhlhGrNCVtlveqLa54ob2wSDAlr+QrrjFjL+ShUi0wrxYh"
            "MZQuK7cr+igILnEs4Sz6rYWwxqG4MOyeBKikqZOsGip3LeQvb67cqR2z1C7JruKsVqxILvcxSKqrqXIuaqyvqKqrVitMqsEv/ifa"
            "LS0seqwfsI6nE6Y4LfEVByc2sBYqby4OJf2vDadjpoMxOSpusc8mgRs0qMavJyIIMNstLK7HKeioYaQTLKkvzjDxK2ipwa1ipFyx"
            "Ui3UKYcqMq57r6Umdalaq0msnzArLD0tia10q6WrDKfXoNIgES9dMLAgeyx4sI8tzCWWLeUt6y23q18W7i6rsUQqQisfLKgqJbQ6"
            "rIErqCsOr9uWD7E4LNMdiK+yo4ArOSkkq0MvSDBfMB6xvqkiK2YvbjKtrrIwR7KpMYIsYC9kKWEnEqjpMmUrlKxXsL2vQSvvsHks"
            "4Ktvq70olyjnMCMliZ/rLxSo1q3CMccgV61vL4MttCj9Lmug2DABsTotZagdpcApeisuNCUpJ6don1cp8SvGM+AnoS1rrKCoFSku"
            "ml6smjEQrKgxXiyNsL6p5y48r10y2CyDMJEk+bBfHc6uDKb3IlutPi6iqasquCxjqkMvL6g1rE8qWKz6r8MeoacPKEgwF68WKluw"
            "MK5fqcimxCgDL30sMDBVrCSh+Slxrk4hR6jSromoQptiHjEwCK4froSvlqw4LXioxaiGJtmwXiwSMEaugqyOrAwYPiklMKEsECyn"
            "LOUnIK+QL2ktTCVPK1ed0qzboK0xvyJLMbOqv7ICpOkwaS4QqcIuqihEsFIusi6oLbqp8itBLE8jPDKZqvWuISudoI+uGiv/qS0u"
            "HyVjKcSsORzoMCooACpqLmKWUiyIMkmlVZ5lLcym8irbLTItFzHvJqkqCCvnqkksZKcai6UqjaYzrRUiVbATLZohCykeqgqvnCnf"
            "Ixes9i8QMXqmKSyzqq4l0yEjqiUwlypdLrEuQh+pqbGrBq3dJoasSixwLQWvcKaQKu6u5yodJyWmuC2hsjetHKh0sA8sRyofsjmt"
            "gqzgKeMdchs6MOimbjBrJwuswazErhGwlTD7LyaukS2fr4kmIyQcKMshILCEr4EswivdMNqxB7AurBuqA6zdpe0pnq3JMuOqDa2Q"
            "sW8vP6yaq1gvqy6molUp9ydAFNgsK6o6LEGwTSCmpjqtfKQYFDcyiDAZGESchatcKscthy9wLnGyxilpoSSsbK2oLmEl7DEUrYYk"
            "XCG8MOuo2bBULK8oASwsspWi2KzWJEgsBKscLlcr3DApLVGoJy3uqEsoeS7trRqyNSyprC4ovy+iofcbgLJvsJ+vchlBKCKvxSwU"
            "LEIgeq0pLNmsHDEoLGypZagsoQIs8y+2p2Otia/wqAYsaCkctCKhObALqrswmKq+sC4n3bFosc8udS9cpQgtFSYJqmwtGTCjKNsz"
            "FCyFKTCk3xw2rV0vHCkZsSAX/S8CJ5kpmK5srb8sQK+0Luoiv6HtM++pdq1yMm4of7DwKo8gQaszLJmiIS4KLR8t/SZCHIgocaW0"
            "I/Yx4CKbLDIx4aMiJ8AouSg6NNmlBis/I7Us8izaKQirRirArOUdtSlbGlWqAyj/rZEqBaOhK+ua1KwAKZ4Xlq0MMrwuMZxHJwKd"
            "NCtOLCUv1zEcHgAuv6TlqECsC6jzrgmsx7GYMGErFKk4qEcpz6xCI9+srKRxKMyu6Sw9rAOx7y3gKk+wca6JJgQrbzCUKFQoua1o"
            "MCqs+rBeqPWpTrD2pdKtOTA="
        ),
    },
}


def check_storage(storage: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """``storage`` completed with float32 for the keys it leaves out; an unknown key or dtype raises naming the choices."""
    s = dict(storage or {})
    bad = sorted(set(s) - set(_ALLOWED))
    if bad:
        raise CbirError(f"local feature storage: unknown key(s) {bad}; accepted: {sorted(_ALLOWED)}")
    out = dict(STORAGE_FLOAT32)
    for k, v in s.items():
        if str(v) not in _ALLOWED[k]:
            raise CbirError(f"local feature storage: {k} must be one of {list(_ALLOWED[k])}, got {v!r}")
        out[k] = str(v)
    return out


@lru_cache(maxsize=None)
def basis(name: str) -> np.ndarray:
    """The float32 ``(in_dim, columns)`` matrix of basis ``name`` (read-only)."""
    if name not in BASES:
        raise CbirError(f"unknown descriptor projection {name!r}; known: {', '.join(sorted(BASES))}")
    b = BASES[name]
    raw = base64.b64decode("".join(b["data"].split()))
    m = np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(b["in_dim"], b["columns"])
    m.setflags(write=False)
    return m


def basis_sha256(name: str) -> str:
    return hashlib.sha256(basis(name).tobytes()).hexdigest()


class Projection:
    """``x -> l2n(x @ B[:, :dim])`` with a named basis (checked against the features it was learned for)."""

    def __init__(self, conf: Mapping[str, Any], features: str) -> None:
        unknown = sorted(set(conf) - {"basis", "dim", "sha256"})
        if unknown:
            raise CbirError(f"descriptor projection: unknown option(s) {unknown}; accepted: ['basis', 'dim']")
        self.name = str(conf.get("basis", ""))
        b = basis(self.name)
        if conf.get("sha256") not in (None, basis_sha256(self.name)):  # an index recorded another matrix under this name
            raise CbirError(f"descriptor projection {self.name!r}: this cbir holds another matrix under that name (sha256 "
                            f"{basis_sha256(self.name)[:12]}..., the index recorded {str(conf['sha256'])[:12]}...): rebuild the index")
        spec = BASES[self.name]
        if features not in spec["features"]:
            raise CbirError(f"descriptor projection {self.name!r} was learned for {'/'.join(spec['features'])} features, not {features!r}")
        self.dim = int(conf.get("dim") or b.shape[1])
        if not 1 <= self.dim <= b.shape[1]:
            raise CbirError(f"descriptor projection {self.name!r}: dim must be 1..{b.shape[1]}, got {self.dim}")
        self.matrix = np.ascontiguousarray(b[:, : self.dim])

    def __call__(self, desc: np.ndarray) -> np.ndarray:
        d = np.asarray(desc, np.float32)
        if d.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        if d.shape[1] != self.matrix.shape[0]:
            raise CbirError(f"descriptor projection {self.name!r} takes {self.matrix.shape[0]}-d descriptors, got {d.shape[1]}-d")
        p = d @ self.matrix
        return l2n(p)

    def identity(self) -> Dict[str, Any]:
        return {"basis": self.name, "dim": self.dim, "sha256": basis_sha256(self.name)}


def compact(feats: Mapping[str, np.ndarray], storage: Mapping[str, str]) -> Dict[str, np.ndarray]:
    """``feats`` in the dtypes of ``storage`` (see the module docstring), as they will be written and read back."""
    out: Dict[str, np.ndarray] = {}
    kp = np.asarray(feats["keypoints"], np.float32).reshape(-1, 2)
    if storage.get("keypoints") == "uint16" and (kp.size == 0 or float(kp.max()) < UINT16_MAX + 0.5):
        out["keypoints"] = np.clip(np.rint(kp), 0, UINT16_MAX).astype(np.uint16)
    else:
        out["keypoints"] = np.ascontiguousarray(kp)
    desc = np.asarray(feats["descriptors"], np.float32)
    if desc.ndim != 2:
        desc = desc.reshape(kp.shape[0], -1)
    out["descriptors"] = np.ascontiguousarray(desc.astype(np.float16) if storage.get("descriptors") == "float16" else desc)
    sc = np.asarray(feats["scores"], np.float32).reshape(-1)
    if storage.get("scores") == "float16":
        sc = np.clip(sc, -65504, 65504).astype(np.float16)
    out["scores"] = np.ascontiguousarray(sc)
    out["image_size"] = np.asarray(feats["image_size"], np.int64).reshape(2)
    return out


def as_float32(feats: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A features dict with the documented float32 / int64 dtypes (what matchers and RANSAC read)."""
    return {
        "keypoints": np.asarray(feats["keypoints"], np.float32).reshape(-1, 2),
        "descriptors": np.asarray(feats["descriptors"], np.float32),
        "scores": np.asarray(feats["scores"], np.float32).reshape(-1),
        "image_size": np.asarray(feats["image_size"], np.int64).reshape(2),
    }


def learn_basis(columns: int = 32, max_keypoints: int = 2048, sides=(None, 512)) -> np.ndarray:
    """The basis of :data:`BASES` ``rootsift-skimage12``: uncentred PCA (SVD) of RootSIFT over scikit-image's photos.

    Each column's sign is fixed (its largest entry positive) so the result does not depend on the SVD routine's choice.
    """
    from ..data import resize_max_side
    from ..demo import PHOTOS, load_photo
    from . import build_extractor

    ext = build_extractor("rootsift", max_keypoints=max_keypoints)
    descs = []
    for p in PHOTOS:
        img = load_photo(p)
        for side in sides:
            im = img if side is None or max(img.shape[:2]) <= side else resize_max_side(img, side)
            descs.append(ext.extract(im)["descriptors"])
    x = np.concatenate(descs).astype(np.float64)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    b = vt[:columns].T
    b *= np.sign(b[np.abs(b).argmax(axis=0), np.arange(columns)])
    return b.astype(np.float32)


def encode_basis(b: np.ndarray) -> str:
    """Base64 of the little-endian float16 matrix, wrapped at 100 characters (what :data:`BASES` holds)."""
    s = base64.b64encode(np.asarray(b, "<f2").tobytes()).decode()
    return "\n".join(s[i : i + 100] for i in range(0, len(s), 100))


if __name__ == "__main__":  # pragma: no cover - regenerates the shipped basis
    print(encode_basis(learn_basis()))

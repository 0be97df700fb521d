"""Every common link form of a video gives one canonical id."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mora_graphql.errors import ErrorCode, InvalidVideoUrl, MoraError
from mora_graphql.models import Platform
from mora_graphql.video_urls import VideoRef, av_to_bv, parse_video_url

YT = "dQw4w9WgXcQ"
YOUTUBE_FORMS = [
    f"https://www.youtube.com/watch?v={YT}",
    f"http://youtube.com/watch?v={YT}&t=42s",
    f"https://m.youtube.com/watch?feature=share&v={YT}",
    f"https://music.youtube.com/watch?v={YT}&list=RDAMVM{YT}",
    f"https://youtu.be/{YT}?si=AbCdEf123",
    f"https://www.youtube.com/shorts/{YT}",
    f"https://www.youtube.com/embed/{YT}?start=10",
    f"https://www.youtube-nocookie.com/embed/{YT}",
    f"https://www.youtube.com/live/{YT}?feature=shared",
    f"https://www.youtube.com/v/{YT}",
    f"www.youtube.com/watch?v={YT}",
    f"  https://WWW.YOUTUBE.COM/watch?v={YT}  ",
    f"https://www.youtube.com/attribution_link?u={quote(f'/watch?v={YT}&feature=share')}",
]

BV = "BV1GJ411x7h7"
BILIBILI_FORMS = [
    f"https://www.bilibili.com/video/{BV}",
    f"https://www.bilibili.com/video/{BV}/?spm_id_from=333.999.0.0&vd_source=abc",
    f"https://m.bilibili.com/video/{BV}",
    f"https://b23.tv/{BV}",
    f"https://player.bilibili.com/player.html?bvid={BV}&autoplay=0",
    BV,
    f"bilibili.com/video/{BV}",
]


@pytest.mark.parametrize("url", YOUTUBE_FORMS)
def test_youtube_forms(url: str) -> None:
    ref = parse_video_url(url)
    assert ref == VideoRef(
        Platform.YOUTUBE, f"youtube:{YT}", f"https://www.youtube.com/watch?v={YT}"
    )
    assert ref.native_id == YT


def test_ten_youtube_forms_share_one_id() -> None:
    ids = {parse_video_url(url).canonical_id for url in YOUTUBE_FORMS[:10]}
    assert ids == {f"youtube:{YT}"}


@pytest.mark.parametrize("url", BILIBILI_FORMS)
def test_bilibili_forms(url: str) -> None:
    ref = parse_video_url(url)
    assert ref.canonical_id == f"bilibili:{BV}"
    assert ref.url == f"https://www.bilibili.com/video/{BV}"
    assert not ref.is_short_link


def test_bilibili_av_and_pages() -> None:
    aid = 170001
    bv = av_to_bv(aid)
    assert bv == "BV17x411w7KC"
    for url in (
        f"av{aid}",
        f"https://www.bilibili.com/video/av{aid}",
        f"https://player.bilibili.com/player.html?aid={aid}",
    ):
        assert parse_video_url(url).canonical_id == f"bilibili:{bv}"
    paged = parse_video_url(f"https://www.bilibili.com/video/{BV}?p=3")
    assert paged.canonical_id == f"bilibili:{BV}:p3"
    assert paged.url.endswith("?p=3")
    assert (
        parse_video_url(f"https://www.bilibili.com/video/{BV}?p=1").canonical_id == f"bilibili:{BV}"
    )


def test_tiktok_and_douyin_forms() -> None:
    vid = "7301234567890123456"
    tiktok = [
        f"https://www.tiktok.com/@codewithmora/video/{vid}",
        f"https://www.tiktok.com/@codewithmora/video/{vid}?is_from_webapp=1&sender_device=pc",
        f"https://m.tiktok.com/v/{vid}.html",
        f"https://www.tiktok.com/embed/v2/{vid}",
        f"https://www.tiktok.com/embed/{vid}",
    ]
    assert {parse_video_url(u).canonical_id for u in tiktok} == {f"tiktok:{vid}"}
    assert {parse_video_url(u).platform for u in tiktok} == {Platform.TIKTOK}
    douyin = [
        f"https://www.douyin.com/video/{vid}",
        f"https://www.douyin.com/discover?modal_id={vid}",
        f"https://www.douyin.com/user/MS4wLjABAAAA?modal_id={vid}",
        f"https://www.iesdouyin.com/share/video/{vid}/?region=CN&mid=1",
        f"https://m.douyin.com/share/video/{vid}",
    ]
    assert {parse_video_url(u).canonical_id for u in douyin} == {f"douyin:{vid}"}


@pytest.mark.parametrize(
    ("url", "provisional"),
    [
        ("https://b23.tv/aBc12De", "b23:aBc12De"),
        ("https://vm.tiktok.com/ZMabc123/", "tiktok-short:ZMabc123"),
        ("https://vt.tiktok.com/ZSxyz789/", "tiktok-short:ZSxyz789"),
        ("https://www.tiktok.com/t/ZTRabc12/", "tiktok-short:ZTRabc12"),
        ("https://v.douyin.com/iRNBho6u/", "douyin-short:iRNBho6u"),
    ],
)
def test_short_links_are_provisional(url: str, provisional: str) -> None:
    ref = parse_video_url(url)
    assert ref.is_short_link
    assert ref.canonical_id == provisional


@pytest.mark.parametrize(
    "url",
    [
        "",
        "https://www.youtube.com/watch?v=short",
        "https://www.youtube.com/channel/UC123",
        "https://youtu.be/",
        "https://www.bilibili.com/video/",
        "https://www.bilibili.com/video/BV123",
        "https://www.tiktok.com/@someone",
        "https://www.douyin.com/user/abc",
        "https://b23.tv/",
        "ftp://youtube.com/watch?v=dQw4w9WgXcQ",
        "javascript:alert(1)",
        "https://user@youtube.com/watch?v=dQw4w9WgXcQ",
        "https://youtube.com:99999/watch?v=dQw4w9WgXcQ",
    ],
)
def test_invalid_links(url: str) -> None:
    with pytest.raises(InvalidVideoUrl):
        parse_video_url(url)


# Properties.

_yt_ids = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-",
    min_size=11,
    max_size=11,
)
_params = st.lists(
    st.tuples(
        st.sampled_from(["t", "si", "feature", "list", "index", "pp", "ab_channel", "start"]),
        st.text(alphabet="abcXYZ0123456789_-", max_size=12),
    ),
    max_size=4,
)
_youtube_templates = st.sampled_from(
    [
        "https://www.youtube.com/watch?v={id}{q}",
        "https://m.youtube.com/watch?v={id}{q}",
        "https://music.youtube.com/watch?v={id}{q}",
        "http://youtube.com/watch?v={id}{q}",
        "https://youtu.be/{id}?x=1{q}",
        "https://www.youtube.com/shorts/{id}?x=1{q}",
        "https://www.youtube.com/embed/{id}?x=1{q}",
        "https://www.youtube.com/live/{id}?x=1{q}",
        "https://www.youtube-nocookie.com/embed/{id}?x=1{q}",
        "youtube.com/watch?v={id}{q}",
    ]
)


@given(_yt_ids, _youtube_templates, _params)
@settings(max_examples=400, deadline=None)
def test_property_youtube_forms_agree(
    video_id: str, template: str, params: list[tuple[str, str]]
) -> None:
    query = "".join(f"&{key}={value}" for key, value in params)
    ref = parse_video_url(template.format(id=video_id, q=query))
    assert ref.canonical_id == f"youtube:{video_id}"
    assert parse_video_url(ref.url) == ref  # the canonical URL is a fixed point


_bv = st.text(
    alphabet="ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz123456789", min_size=9, max_size=9
).map(lambda tail: "BV1" + tail)


@given(
    _bv,
    st.sampled_from(
        [
            "https://www.bilibili.com/video/{id}",
            "https://m.bilibili.com/video/{id}/",
            "https://b23.tv/{id}",
            "{id}",
            "https://player.bilibili.com/player.html?bvid={id}",
        ]
    ),
    _params,
)
@settings(max_examples=300, deadline=None)
def test_property_bilibili_forms_agree(
    bv: str, template: str, params: list[tuple[str, str]]
) -> None:
    url = template.format(id=bv)
    if "://" in url and params:
        url += ("&" if "?" in url else "?") + "&".join(f"{k}={v}" for k, v in params)
    ref = parse_video_url(url)
    assert ref.canonical_id == f"bilibili:{bv}"
    assert parse_video_url(ref.url) == ref


@given(st.integers(min_value=1, max_value=2**40))
@settings(max_examples=300, deadline=None)
def test_property_av_numbers_map_to_valid_bv(aid: int) -> None:
    bv = av_to_bv(aid)
    assert parse_video_url(f"av{aid}").canonical_id == f"bilibili:{bv}"
    assert parse_video_url(bv).canonical_id == f"bilibili:{bv}"


@given(st.text(max_size=300))
@settings(max_examples=1000, deadline=None)
def test_property_any_text_parses_or_raises_a_mora_error(text: str) -> None:
    try:
        ref = parse_video_url(text)
    except MoraError as exc:
        code = exc.code
        ref = None
    if ref is None:
        assert code in {ErrorCode.INVALID_VIDEO_URL, ErrorCode.UNSUPPORTED_PLATFORM}
        return
    prefix = ref.canonical_id.split(":", 1)[0]
    assert prefix in {
        "youtube",
        "bilibili",
        "tiktok",
        "douyin",
        "b23",
        "tiktok-short",
        "douyin-short",
    }
    assert ref.url.startswith("https://")
    assert parse_video_url(ref.url).canonical_id == ref.canonical_id

"""Reading a request's attribution: where each value comes from, and the bounds."""

import pytest
from multidict import CIMultiDict

from gateway_shim.attribution import NO_ATTRIBUTION, Attribution, attribution_of
from gateway_shim.errors import InvalidParameter
from quotameter.config import DEFAULT_CONFIG, load_config

CONFIG = load_config(DEFAULT_CONFIG)


def test_nothing_given_is_no_attribution() -> None:
    assert attribution_of({}, None, CONFIG) is NO_ATTRIBUTION
    assert attribution_of({"x-quotameter-user": ""}, {"user": ""}, CONFIG) is NO_ATTRIBUTION


def test_where_the_end_user_comes_from() -> None:
    body = {"user": "u-body", "safety_identifier": "u-safety", "metadata": {"user_id": "u-meta"}}
    assert attribution_of(CIMultiDict({"X-Quotameter-User": "u-head"}), body, CONFIG).end_user == "u-head"
    assert attribution_of({"X-QUOTAMETER-USER": "u-head"}, body, CONFIG).end_user == "u-head"  # any case
    assert attribution_of({}, body, CONFIG).end_user == "u-safety"
    assert attribution_of({}, {"user": "u-body", "metadata": {"user_id": "u-meta"}}, CONFIG).end_user == "u-body"
    assert attribution_of({}, {"metadata": {"user_id": "u-meta"}}, CONFIG).end_user == "u-meta"
    assert attribution_of({}, {"user": 5, "metadata": "x"}, CONFIG) is NO_ATTRIBUTION  # the upstream's to refuse


def test_tags_are_sorted_trimmed_and_bounded() -> None:
    got = attribution_of({"x-quotameter-tags": " team=search , feature=auto:v2/a@b+c-d ,", "x-quotameter-project": "p"},
                         None, CONFIG)
    assert got == Attribution(None, "p", (("feature", "auto:v2/a@b+c-d"), ("team", "search")))
    assert len(attribution_of({"x-quotameter-tags": ",".join(f"k{n}=v" for n in range(16))}, None, CONFIG).tags) == 16
    for bad in ("team", "team=", "=x", "team=a b", "team=a;b", "te'am=x", "team=é", "a=1,a=2", "_x=1",
                ",".join(f"k{n}=v" for n in range(17)), "k=" + "v" * 129, "k" * 65 + "=v"):
        with pytest.raises(InvalidParameter) as caught:
            attribution_of({"x-quotameter-tags": bad}, None, CONFIG)
        assert caught.value.param == "x-quotameter-tags" and caught.value.status == 400, bad


@pytest.mark.parametrize("value", ["u" * 257, "a\nb", "a\x00", "\ud800", "a\u2028b", " lead", "trail\t", "a\x85b"])
def test_end_users_and_projects_out_of_bounds_are_refused(value: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        attribution_of({}, {"user": value}, CONFIG)
    assert caught.value.param == "user"
    with pytest.raises(InvalidParameter) as caught:
        attribution_of({"x-quotameter-project": value}, None, CONFIG)
    assert caught.value.param == "x-quotameter-project"


def test_the_header_names_and_the_tag_count_are_configurable() -> None:
    config = CONFIG.model_copy(update={"shim": CONFIG.shim.model_copy(update={
        "end_user_header": "x-end-user", "tags_header": "x-tags", "project_header": "x-proj", "max_tags": 1})})
    got = attribution_of({"x-end-user": "u", "x-tags": "a=1", "x-proj": "p", "x-quotameter-user": "no"}, None, config)
    assert got == Attribution("u", "p", (("a", "1"),))
    with pytest.raises(InvalidParameter):
        attribution_of({"x-tags": "a=1,b=2"}, None, config)

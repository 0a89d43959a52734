"""The Chinese ImageNet class names of the offline default model (``imagenet_zh.tsv``): every
class named, in the classifier's order, aligned with the English names, common classes right."""

from __future__ import annotations

import re

import pytest

from mmembed.models.conse import ConSEBackend, _imagenet_names, imagenet_names_zh

# Reviewed by hand: classes people search for most (pets, vehicles, food, household objects).
COMMON = {
    1: "金鱼",
    7: "公鸡",
    9: "鸵鸟",
    130: "火烈鸟",
    145: "王企鹅",
    151: "吉娃娃",
    207: "金毛寻回犬",
    208: "拉布拉多犬",
    235: "德国牧羊犬",
    258: "萨摩耶",
    281: "虎斑猫",
    283: "波斯猫",
    291: "狮子",
    292: "老虎",
    296: "北极熊",
    301: "瓢虫",
    309: "蜜蜂",
    340: "斑马",
    341: "猪",
    388: "大熊猫",
    404: "客机",
    407: "救护车",
    417: "气球",
    430: "篮球",
    444: "双人自行车",
    468: "出租车",
    487: "手机",
    504: "咖啡杯",
    508: "电脑键盘",
    555: "消防车",
    620: "笔记本电脑",
    779: "校车",
    805: "足球",
    812: "航天飞机",
    817: "跑车",
    831: "沙发",
    849: "茶壶",
    851: "电视机",
    879: "雨伞",
    920: "红绿灯",
    926: "火锅",
    928: "冰淇淋",
    934: "热狗",
    949: "草莓",
    954: "香蕉",
    963: "披萨",
    970: "山",
    978: "海滩",
    980: "火山",
}


def test_every_class_has_a_chinese_name_in_order():
    zh, en = imagenet_names_zh(), _imagenet_names()
    assert len(zh) == len(en) == 1000
    assert all(re.search(r"[\u4e00-\u9fff]", name) for name in zh)
    assert len(set(zh)) >= 990  # a few English names repeat too (e.g. two "missile")
    for index, name in COMMON.items():
        assert zh[index] == name, (index, en[index], zh[index])


def test_language_options_are_checked():
    with pytest.raises(ValueError, match="languages"):
        ConSEBackend(languages=["fr"])
    backend = ConSEBackend(prompts_en=["a {}"], prompts_zh=["{}"], languages=["zh"])
    assert backend.prompts == {"en": ["a {}"], "zh": ["{}"]} and backend.languages == ["zh"]

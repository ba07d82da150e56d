"""The words of the synthetic shop: markets, first names, category tree, brands, reviews.

Everything here is constant data. Names include accents, apostrophes and
non-Latin scripts on purpose, so escaping and encoding are exercised
downstream. Email domains are the reserved ``example.*`` ones (RFC 2606): a
generated address can never reach a real mailbox.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Market:
    locale: str
    country: str
    timezone: str
    names: str
    weight: float


# Shares of the user base. zh-CN is large so Chinese text is common; Kolkata is
# UTC+05:30, which catches code that assumes whole-hour offsets.
MARKETS: tuple[Market, ...] = (
    Market("en", "US", "America/New_York", "en", 0.14),
    Market("en", "US", "America/Chicago", "en", 0.06),
    Market("en", "US", "America/Los_Angeles", "en", 0.08),
    Market("en-GB", "GB", "Europe/London", "en", 0.10),
    Market("zh-CN", "CN", "Asia/Shanghai", "zh", 0.20),
    Market("de", "DE", "Europe/Berlin", "de", 0.10),
    Market("fr", "FR", "Europe/Paris", "fr", 0.07),
    Market("es", "ES", "Europe/Madrid", "es", 0.05),
    Market("ja", "JP", "Asia/Tokyo", "ja", 0.05),
    Market("pt-BR", "BR", "America/Sao_Paulo", "pt", 0.05),
    Market("en", "AU", "Australia/Sydney", "en", 0.04),
    Market("en", "IN", "Asia/Kolkata", "in", 0.06),
)

# (display name, ASCII form used in the email address)
FIRST_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "en": (("James", "james"), ("Mary", "mary"), ("Olivia", "olivia"), ("Liam", "liam"), ("Emma", "emma"),
           ("Noah", "noah"), ("Ava", "ava"), ("Zoë", "zoe"), ("Mary-Jane", "maryjane"), ("D'Arcy", "darcy"),
           ("Sophia", "sophia"), ("Lucas", "lucas"), ("Amelia", "amelia"), ("Ethan", "ethan"), ("Grace", "grace")),
    "zh": (("伟", "wei"), ("芳", "fang"), ("娜", "na"), ("敏", "min"), ("静", "jing"), ("磊", "lei"),
           ("洋", "yang"), ("婷", "ting"), ("子轩", "zixuan"), ("欣怡", "xinyi"), ("浩然", "haoran"), ("梓涵", "zihan")),
    "de": (("Jürgen", "juergen"), ("Anna", "anna"), ("Lukas", "lukas"), ("Sophie", "sophie"), ("Jörg", "joerg"),
           ("Lena", "lena"), ("Maximilian", "maximilian"), ("Hannah", "hannah"), ("Günther", "guenther")),
    "fr": (("Renée", "renee"), ("Léa", "lea"), ("Hugo", "hugo"), ("Chloé", "chloe"), ("Théo", "theo"),
           ("Camille", "camille"), ("Zoé", "zoe"), ("Jean-Luc", "jeanluc"), ("Inès", "ines")),
    "es": (("José", "jose"), ("María", "maria"), ("Ángel", "angel"), ("Lucía", "lucia"), ("Sofía", "sofia"),
           ("Pablo", "pablo"), ("Martina", "martina"), ("Íñigo", "inigo")),
    "ja": (("陽翔", "haruto"), ("結衣", "yui"), ("蓮", "ren"), ("さくら", "sakura"), ("悠真", "yuma"),
           ("美咲", "misaki"), ("ハルカ", "haruka")),
    "pt": (("João", "joao"), ("Ana", "ana"), ("Gabriel", "gabriel"), ("Júlia", "julia"), ("Conceição", "conceicao"),
           ("Miguel", "miguel"), ("Beatriz", "beatriz")),
    "in": (("Priya", "priya"), ("Arjun", "arjun"), ("Ananya", "ananya"), ("Rohan", "rohan"), ("Aarav", "aarav"),
           ("Diya", "diya"), ("Ishaan", "ishaan")),
}

EMAIL_DOMAINS = ("example.com", "example.net", "example.org")


@dataclass(frozen=True)
class Leaf:
    """A leaf of the category tree, with what its products are called and searched as."""

    path: str
    base_price: float
    noun: str
    queries: tuple[str, ...]
    query_zh: str

    @property
    def department(self) -> str:
        return self.path.split(" > ")[0]


LEAVES: tuple[Leaf, ...] = (
    Leaf("Sports > Running > Shoes", 95, "Running Shoes", ("running shoes", "trail shoes"), "跑鞋"),
    Leaf("Sports > Running > Apparel", 45, "Running Tee", ("running shirt", "running tights"), "跑步服"),
    Leaf("Sports > Cycling > Helmets", 80, "Bike Helmet", ("bike helmet", "cycling helmet"), "自行车头盔"),
    Leaf("Sports > Yoga > Mats", 35, "Yoga Mat", ("yoga mat", "exercise mat"), "瑜伽垫"),
    Leaf("Electronics > Audio > Headphones", 150, "Wireless Headphones", ("headphones", "earbuds"), "耳机"),
    Leaf("Electronics > Phones > Accessories", 25, "Phone Case", ("phone case", "usb-c charger"), "手机壳"),
    Leaf("Electronics > Computers > Laptops", 1100, "Laptop", ("laptop", "ultrabook"), "笔记本电脑"),
    Leaf("Electronics > Cameras > Lenses", 450, "Camera Lens", ("camera lens", "50mm lens"), "相机镜头"),
    Leaf("Home > Kitchen > Cookware", 60, "Frying Pan", ("frying pan", "cookware set"), "炒锅"),
    Leaf("Home > Furniture > Chairs", 180, "Desk Chair", ("office chair", "desk chair"), "椅子"),
    Leaf("Home > Decor > Lighting", 55, "Table Lamp", ("table lamp", "led lamp"), "台灯"),
    Leaf("Home > Garden > Tools", 30, "Garden Shears", ("garden tools", "pruning shears"), "园艺工具"),
    Leaf("Fashion > Women > Dresses", 70, "Summer Dress", ("summer dress", "maxi dress"), "连衣裙"),
    Leaf("Fashion > Men > Jackets", 130, "Rain Jacket", ("rain jacket", "men's jacket"), "夹克"),
    Leaf("Fashion > Accessories > Bags", 90, "Leather Bag", ("leather bag", "backpack"), "包"),
    Leaf("Fashion > Shoes > Sneakers", 85, "Sneakers", ("sneakers", "white sneakers"), "运动鞋"),
    Leaf("Beauty > Skincare > Serums", 40, "Face Serum", ("vitamin c serum", "face serum"), "精华"),
    Leaf("Beauty > Makeup > Lipstick", 22, "Lipstick", ("red lipstick", "matte lipstick"), "口红"),
    Leaf("Beauty > Fragrance > Perfume", 75, "Eau de Parfum", ("perfume", "eau de parfum"), "香水"),
    Leaf("Books > Fiction > Mystery", 15, "Mystery Novel", ("mystery novel", "crime thriller"), "推理小说"),
    Leaf("Books > Non-fiction > Cooking", 28, "Cookbook", ("cookbook", "baking book"), "食谱"),
    Leaf("Books > Children > Picture Books", 12, "Picture Book", ("picture book", "bedtime story"), "绘本"),
    Leaf("Toys > Building > Blocks", 50, "Building Set", ("building blocks", "construction set"), "积木"),
    Leaf("Toys > Games > Board Games", 35, "Board Game", ("board game", "family game"), "桌游"),
    Leaf("Grocery > Coffee > Beans", 18, "Coffee Beans", ("coffee beans", "espresso beans"), "咖啡豆"),
    Leaf("Grocery > Snacks > Chocolate", 8, "Dark Chocolate", ("dark chocolate", "chocolate"), "巧克力"),
)

DEPARTMENTS: tuple[str, ...] = tuple(dict.fromkeys(leaf.department for leaf in LEAVES))

# Four brands per department, cheapest first: the price multiplier makes brand and
# price band correlate, as they do in real catalogues.
BRAND_PRICE_MULTIPLIERS = (0.65, 0.95, 1.1, 1.6)
BRANDS: dict[str, tuple[str, str, str, str]] = {
    "Sports": ("Stride", "Peakline", "Velo", "Zenflow"),
    "Electronics": ("Voltic", "Nimbus", "Auralis", "Pixelon"),
    "Home": ("Greenthumb", "Lumen", "Oakline", "Hearth & Co"),
    "Fashion": ("Cobble", "Urbanite", "Northfold", "Maison Lune"),
    "Beauty": ("Pure Botanica", "Glowery", "Aqualis", "Velvet Rose"),
    "Books": ("Paperlane", "Little Owl", "Foxglove", "Inkwell Press"),
    "Toys": ("Tinker Toys", "Brickly", "Playforge", "Meeple Mill"),
    "Grocery": ("Nibble", "Daily Grind", "Cocoa Loco", "Bean Bros"),
}

PRICE_BANDS = ("budget", "mid", "premium")


@dataclass(frozen=True)
class TasteGroup:
    """A latent segment: the categories, brands and price band its members favour."""

    name: str
    categories: tuple[str, ...]
    brands: tuple[str, ...]
    price_band: str
    weight: float


TASTE_GROUPS: tuple[TasteGroup, ...] = (
    TasteGroup("runners", ("Sports > Running > Shoes", "Sports > Running > Apparel", "Sports > Yoga > Mats",
                           "Grocery > Coffee > Beans"), ("Stride", "Zenflow"), "mid", 0.16),
    TasteGroup("tech enthusiasts", ("Electronics > Audio > Headphones", "Electronics > Phones > Accessories",
                                    "Electronics > Computers > Laptops", "Electronics > Cameras > Lenses"),
               ("Auralis", "Pixelon"), "premium", 0.14),
    TasteGroup("home cooks", ("Home > Kitchen > Cookware", "Books > Non-fiction > Cooking", "Grocery > Coffee > Beans",
                              "Grocery > Snacks > Chocolate"), ("Hearth & Co", "Bean Bros"), "mid", 0.12),
    TasteGroup("fashion lovers", ("Fashion > Women > Dresses", "Fashion > Accessories > Bags",
                                  "Fashion > Shoes > Sneakers", "Beauty > Makeup > Lipstick"),
               ("Maison Lune", "Velvet Rose"), "premium", 0.14),
    TasteGroup("young parents", ("Books > Children > Picture Books", "Toys > Building > Blocks",
                                 "Toys > Games > Board Games", "Home > Garden > Tools"),
               ("Little Owl", "Brickly"), "budget", 0.12),
    TasteGroup("beauty fans", ("Beauty > Skincare > Serums", "Beauty > Makeup > Lipstick",
                               "Beauty > Fragrance > Perfume", "Fashion > Women > Dresses"),
               ("Glowery", "Aqualis"), "mid", 0.10),
    TasteGroup("home makers", ("Home > Furniture > Chairs", "Home > Decor > Lighting", "Home > Garden > Tools",
                               "Home > Kitchen > Cookware"), ("Oakline", "Lumen"), "mid", 0.12),
    TasteGroup("bookworms", ("Books > Fiction > Mystery", "Books > Children > Picture Books",
                             "Toys > Games > Board Games", "Grocery > Coffee > Beans"),
               ("Inkwell Press", "Meeple Mill"), "budget", 0.10),
)

PRODUCT_MODELS = ("Aero", "Classic", "Pro", "Lite", "Max", "Urban", "Trail", "Essential", "Signature", "Nova",
                  "Prime", "Eco")
PRODUCT_BLURBS = (
    "lightweight, durable and easy to care for",
    "our best-seller, now in new colours",
    'the "everyday" pick, built to last',
    "made from recycled materials, with a 2-year warranty",
    "compact, practical and great value",
    'rated "excellent" by our customers, with free returns',
)

# Review phrases by sentiment. Ratings 4-5 draw positive words, 1-2 negative and
# 3 neutral, so a sentiment model has a signal that agrees with the rating.
REVIEW_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "positive": ("love it", "excellent quality", "works perfectly", "great value", "highly recommend",
                     "fast delivery", "fits perfectly", "beautiful design", "better than expected"),
        "neutral": ("it is okay", "average quality", "does the job", "nothing special", "decent for the price",
                    "as described"),
        "negative": ("broke after a week", "terrible quality", "waste of money", "very disappointed",
                     "arrived damaged", "does not work", "poor fit", "would not buy again"),
    },
    "zh": {
        "positive": ("非常好", "质量很好", "物超所值", "强烈推荐", "很喜欢", "发货很快", "超出预期"),
        "neutral": ("还可以", "一般般", "中规中矩", "和描述一致"),
        "negative": ("质量太差", "很失望", "不推荐", "用了一周就坏了", "浪费钱", "收到时已损坏"),
    },
}

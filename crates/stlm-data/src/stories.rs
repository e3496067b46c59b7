//! The built-in corpus: a seeded generator of simple English stories in the manner of
//! TinyStories (characters, places, a small problem, dialogue, a resolution), written for stlm.
//!
//! Each story picks a hero and a friend (children or named animals, with consistent pronouns),
//! a place, an object and one of seven plots; every beat of a plot has several phrasings. The
//! text is a pure function of (seed, index), so a corpus of any size is reproducible and the
//! default `stlm train` needs no download. It is simple enough for a 2M-parameter model to learn
//! in minutes on a CPU and varied enough (millions of distinct stories) not to be memorised.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The `count` stories of the corpus with this `seed`, in order.
pub fn generate_stories(seed: u64, count: usize) -> Vec<String> {
    (0..count as u64).map(|i| story(seed, i)).collect()
}

/// Story number `index` of the corpus with this `seed`.
pub fn story(seed: u64, index: u64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let plot = PLOTS.choose(&mut rng).expect("plots are not empty");
    let mut s = Story::cast(&mut rng);
    plot(&mut s);
    s.text()
}

const GIRLS: &[&str] = &[
    "Lily", "Mia", "Anna", "Sue", "Lucy", "Emma", "Zoe", "Amy", "Ella", "Sara", "Kim", "Rosie", "Nora", "Ivy", "Grace",
    "Daisy", "Ruby", "Molly", "Jane", "Sophie",
];
const BOYS: &[&str] = &[
    "Tom", "Ben", "Max", "Sam", "Jack", "Tim", "Leo", "Bob", "Dan", "Finn", "Jake", "Noah", "Ollie", "Ned", "Pete",
    "Ryan", "Hugo", "Billy", "Joe", "Luke",
];
const ANIMALS: &[&str] = &[
    "cat", "dog", "bunny", "bear", "bird", "fox", "mouse", "duck", "frog", "puppy", "kitten", "owl", "squirrel", "pig",
    "lamb", "turtle",
];
const PET_NAMES: &[&str] = &[
    "Pip", "Spot", "Fluffy", "Buddy", "Coco", "Whiskers", "Bubbles", "Sunny", "Patch", "Muffin", "Biscuit", "Nibbles",
    "Ziggy", "Pepper", "Snowy", "Bean",
];
const ADJECTIVES: &[&str] =
    &["little", "kind", "happy", "brave", "shy", "curious", "funny", "small", "sleepy", "clever", "gentle", "busy"];
const HOMES: &[&str] = &[
    "in a little house by the sea",
    "in a big city",
    "on a farm",
    "in a small town",
    "near a big forest",
    "in a cozy house with a red door",
    "in a tall tree",
    "next to a quiet river",
];
const PLACES: &[&str] = &[
    "the park",
    "the forest",
    "the beach",
    "the garden",
    "the farm",
    "the lake",
    "the playground",
    "the hill behind the house",
    "the meadow",
    "the market",
];
const OBJECTS: &[&str] = &["ball", "kite", "teddy bear", "toy car", "doll", "hat", "book", "balloon", "boat", "drum"];
const COLORS: &[&str] =
    &["red", "blue", "yellow", "green", "shiny", "soft", "little", "big", "pink", "purple", "striped"];
const HOBBIES: &[(&str, &str)] = &[
    ("play in the sun", "playing in the sun"),
    ("run and jump", "running and jumping"),
    ("draw pictures", "drawing pictures"),
    ("sing songs", "singing songs"),
    ("read books", "reading books"),
    ("climb trees", "climbing trees"),
    ("dig in the sand", "digging in the sand"),
    ("look at the stars", "looking at the stars"),
    ("pick flowers", "picking flowers"),
    ("dance", "dancing"),
];
const SPOTS: &[&str] = &[
    "under the big tree",
    "behind the rocks",
    "in the tall grass",
    "near the pond",
    "under a bench",
    "next to the flowers",
    "inside an old box",
    "by the fence",
];
const GAMES: &[(&str, &str)] = &[
    ("play tag", "played tag"),
    ("play hide and seek", "played hide and seek"),
    ("build a sand castle", "built a big sand castle"),
    ("race to the big tree", "raced to the big tree"),
    ("look for pretty stones", "looked for pretty stones"),
    ("fly a kite", "flew a kite"),
    ("play ball", "played ball"),
];
const FOODS: &[&str] = &["cake", "pie", "pizza", "chocolate cake", "berry pie", "carrot cake", "loaf of bread"];
const FRAGILE: &[&str] = &["blue vase", "lamp", "cup", "picture frame", "jar of jam", "plate", "flower pot"];
const TREASURES: &[&str] =
    &["small gold key", "pretty blue stone", "tiny music box", "old map", "shiny coin", "big white feather"];

/// A story being written: its cast (the values of `{key}` placeholders) and its sentences.
struct Story<'r> {
    rng: &'r mut ChaCha8Rng,
    vars: Vec<(String, String)>,
    sentences: Vec<String>,
}

impl<'r> Story<'r> {
    /// Picks the hero `a`, the friend `b`, a parent `par`, a place, a home and an object.
    fn cast(rng: &'r mut ChaCha8Rng) -> Self {
        let mut s = Story { rng, vars: Vec::new(), sentences: Vec::new() };
        let hero = s.character("a", None);
        s.character("b", Some(&hero));
        let mom = s.rng.random_bool(0.5);
        s.set("par", if mom { "mom" } else { "dad" });
        s.pronouns("par", mom);
        for (key, list) in [("place", PLACES), ("home", HOMES), ("obj", OBJECTS), ("color", COLORS)] {
            let v = s.any(list);
            s.set(key, v);
        }
        let (hobby, hobbying) = *HOBBIES.choose(s.rng).expect("not empty");
        s.set("hobby", hobby);
        s.set("hobbying", hobbying);
        s
    }

    /// A child or a named animal under `key`, whose name differs from `other`'s.
    fn character(&mut self, key: &str, other: Option<&str>) -> String {
        let (name, kind, she) = loop {
            let she = self.rng.random_bool(0.5);
            let (name, kind) = if self.rng.random_bool(0.6) {
                (self.any(if she { GIRLS } else { BOYS }), if she { "girl" } else { "boy" })
            } else {
                (self.any(PET_NAMES), self.any(ANIMALS))
            };
            if Some(name) != other {
                break (name, kind, she);
            }
        };
        let adj = self.any(ADJECTIVES);
        self.set(key, name);
        self.set(&format!("{key}.kind"), kind);
        self.set(&format!("{key}.adj"), adj);
        self.pronouns(key, she);
        name.to_string()
    }

    fn pronouns(&mut self, key: &str, she: bool) {
        let forms = if she { ["she", "She", "her", "her", "Her"] } else { ["he", "He", "him", "his", "His"] };
        for (form, value) in ["he", "He", "him", "his", "His"].into_iter().zip(forms) {
            self.set(&format!("{key}.{form}"), value);
        }
    }

    fn set(&mut self, key: &str, value: &str) {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_string(), value.to_string()));
    }

    fn any(&mut self, list: &[&'static str]) -> &'static str {
        list.choose(self.rng).expect("word lists are not empty")
    }

    /// Adds one of `variants`, with placeholders filled.
    fn say(&mut self, variants: &[&str]) {
        let template = *variants.choose(self.rng).expect("variants are not empty");
        let text = self.fill(template);
        self.sentences.push(text);
    }

    /// Adds one of `variants` with probability `p`.
    fn maybe(&mut self, p: f64, variants: &[&str]) {
        if self.rng.random_bool(p) {
            self.say(variants);
        }
    }

    fn fill(&self, template: &str) -> String {
        let mut out = String::with_capacity(template.len() + 32);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = open + rest[open..].find('}').expect("placeholder is closed");
            let key = &rest[open + 1..close];
            let value = self.vars.iter().find(|(k, _)| *k == key);
            out.push_str(&value.unwrap_or_else(|| panic!("story placeholder {{{key}}} has no value")).1);
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out
    }

    /// Paragraphs of four sentences.
    fn text(self) -> String {
        self.sentences.chunks(4).map(|p| p.join(" ")).collect::<Vec<_>>().join("\n")
    }

    /// The opening: who the hero is and what they like.
    fn intro(&mut self) {
        self.say(&[
            "Once upon a time, there was a {a.adj} {a.kind} named {a}.",
            "Once upon a time, {home}, there lived a {a.adj} {a.kind} named {a}.",
            "There was once a {a.adj} {a.kind} called {a}.",
            "{a} was a {a.adj} {a.kind} who lived {home}.",
            "Once there was a {a.adj} {a.kind}. {a.His} name was {a}.",
        ]);
        self.maybe(
            0.8,
            &[
                "{a.He} liked to {hobby}.",
                "{a.He} loved {hobbying} more than anything.",
                "Every day, {a.he} liked to {hobby}.",
                "{a.His} favorite thing was {hobbying}.",
            ],
        );
    }
}

type Plot = fn(&mut Story);

const PLOTS: &[Plot] = &[lost_thing, sharing, brave, new_friend, baking, honesty, adventure];

fn lost_thing(s: &mut Story) {
    s.intro();
    s.say(&[
        "{a} had a {color} {obj}. {a.He} took it everywhere.",
        "{a.His} favorite toy was a {color} {obj}.",
        "{a} had a {color} {obj} that {a.he} loved very much.",
    ]);
    s.say(&[
        "One day, {a} went to {place} with {a.his} {obj}.",
        "One sunny morning, {a} took {a.his} {obj} to {place}.",
    ]);
    s.maybe(
        0.7,
        &["{a.He} played there all day.", "{a.He} had lots of fun there.", "{a.He} ran and played and laughed."],
    );
    s.say(&[
        "When it was time to go home, {a} could not find {a.his} {obj}.",
        "But when {a.he} looked down, the {obj} was gone!",
        "Then {a} looked around. Where was {a.his} {obj}?",
    ]);
    s.say(&["{a} felt very sad.", "{a.He} started to cry.", "{a} was sad and did not know what to do."]);
    s.say(&[
        "Just then, {b} the {b.kind} came by.",
        "{a.His} friend {b}, a {b.adj} {b.kind}, saw {a.him}.",
        "A {b.adj} {b.kind} named {b} heard {a.him}.",
    ]);
    s.say(&["\"Why are you sad, {a}?\" asked {b}.", "\"What is wrong?\" {b} asked."]);
    s.say(&["\"I lost my {obj},\" said {a}.", "\"I can't find my {obj},\" {a} said."]);
    s.say(&["\"Don't worry. I will help you look,\" said {b}.", "\"Let's look for it together,\" said {b}."]);
    let (first, second) = two_spots(s);
    s.set("spot1", first);
    s.set("spot2", second);
    s.say(&["They looked {spot1}, but the {obj} was not there.", "First they looked {spot1}. Nothing."]);
    s.say(&["At last, {b} found the {obj} {spot2}!", "Then {a} saw something {color} {spot2}. It was the {obj}!"]);
    s.say(&[
        "{a} was so happy. \"Thank you, {b}!\" {a.he} said. \"You are a good friend.\"",
        "{a} hugged {b}. \"Thank you for helping me!\"",
    ]);
    s.say(&[
        "From that day on, {a} and {b} played together every day.",
        "{a} held {a.his} {obj} tight all the way home.",
        "{a} learned that friends help each other.",
    ]);
}

fn two_spots(s: &mut Story) -> (&'static str, &'static str) {
    let first = s.any(SPOTS);
    loop {
        let second = s.any(SPOTS);
        if second != first {
            return (first, second);
        }
    }
}

fn sharing(s: &mut Story) {
    s.intro();
    s.say(&[
        "One day, {a} got a new {obj}. It was {color} and {a.he} loved it very much.",
        "For {a.his} birthday, {a} got a {color} {obj}.",
    ]);
    s.say(&[
        "{b} the {b.kind} saw the {obj} and wanted to play with it too.",
        "{a.His} friend {b} looked at the {obj} with big eyes.",
    ]);
    s.say(&["\"Can I play with your {obj}?\" asked {b}.", "\"Can I have a turn, please?\" {b} asked."]);
    s.say(&["\"No! It is mine!\" said {a}.", "{a} held the {obj} close and said, \"No, it is mine.\""]);
    s.say(&["{b} felt sad and walked away.", "{b} looked down and did not say anything."]);
    s.say(&[
        "{a.His} {par} saw what happened. \"{a}, sharing is kind,\" {par.he} said. \"When you share, everyone can have fun.\"",
        "Later, {a.his} {par} said, \"How would you feel if {b} did not share with you?\"",
    ]);
    s.say(&["{a} thought about it. Then {a.he} ran to {b}.", "{a} felt bad. {a.He} went to find {b}."]);
    s.say(&["\"I am sorry, {b}. Do you want to play with my {obj}?\"", "\"Here, {b}. We can play with it together.\""]);
    s.say(&["{b} smiled. \"Yes, please!\"", "{b} was very happy. \"Thank you, {a}!\""]);
    s.say(&[
        "They played with the {obj} together, and it was more fun than playing alone.",
        "They took turns all afternoon and laughed a lot.",
    ]);
    s.maybe(0.7, &["{a} learned that sharing makes everyone happy.", "Sharing made {a} feel warm inside."]);
}

fn brave(s: &mut Story) {
    /// What is feared, how it comes, what the hero does, and what it turns out to be.
    const FEARS: &[[&str; 4]] = &[
        [
            "the dark",
            "One night, {a.his} room was very dark, and {a.he} heard a strange noise.",
            "{a} took a deep breath and turned on {a.his} little lamp.",
            "It was only {b} the {b.kind}, who wanted to say good night.",
        ],
        [
            "the big dog next door",
            "One day, the big dog ran up to {a} at {place}.",
            "{a} wanted to run away, but {a.he} stood still and said hello.",
            "The dog wagged its tail and licked {a.his} hand. It only wanted to play.",
        ],
        [
            "thunder",
            "One afternoon, dark clouds came and the sky went boom!",
            "{a} hid under {a.his} blanket. Then {a.his} {par} sat next to {a.him}, and they counted the seconds between the flashes.",
            "Soon the storm went away, and a big rainbow came out.",
        ],
        [
            "the tall slide",
            "At {place}, all the other kids went down the tall slide.",
            "{a} climbed up the steps one by one. At the top, {a.he} closed {a.his} eyes and let go.",
            "Whoosh! It was fast and fun, and {a} laughed all the way down.",
        ],
        [
            "the deep water",
            "One hot day, {a.his} family went to the lake.",
            "{a.His} {par} held {a.his} hand, and {a} put one foot in the water, then the other.",
            "The water was cool and nice, and soon {a} was splashing and kicking.",
        ],
    ];
    let fear = *FEARS.choose(s.rng).expect("not empty");
    s.set("fear", fear[0]);
    s.intro();
    s.say(&[
        "But {a} was afraid of {fear}.",
        "There was one thing {a} did not like: {fear}.",
        "{a} was scared of {fear}.",
    ]);
    s.say(&[fear[1]]);
    s.maybe(0.6, &["{a.His} heart went thump, thump, thump.", "{a} wanted to cry.", "{a.He} was very scared."]);
    s.say(&[fear[2]]);
    s.say(&[fear[3]]);
    s.say(&["\"I did it!\" said {a}.", "\"That was not so bad,\" {a} said with a smile."]);
    s.say(&[
        "{a.His} {par} gave {a.him} a big hug. \"I am proud of you,\" {par.he} said.",
        "{a} was not scared of {fear} anymore.",
    ]);
    s.maybe(
        0.6,
        &["{a} learned that being brave feels good.", "From then on, {a} felt a little bigger and a little braver."],
    );
}

fn new_friend(s: &mut Story) {
    let (game, played) = *GAMES.choose(s.rng).expect("not empty");
    s.set("game", game);
    s.set("played", played);
    s.intro();
    s.say(&[
        "{a} did not have any friends, and {a.he} often felt lonely.",
        "But {a} was lonely. {a.He} had no one to play with.",
    ]);
    s.say(&[
        "One day, {a} went to {place}. There {a.he} saw a {b.adj} {b.kind} sitting all alone.",
        "One morning at {place}, {a} met a {b.adj} {b.kind} who looked lonely too.",
    ]);
    s.say(&[
        "\"Hello,\" said {a}. \"My name is {a}. What is your name?\"",
        "\"Hi! I am {a},\" said {a}. \"Who are you?\"",
    ]);
    s.say(&["\"I am {b},\" said the {b.kind}. \"I am new here.\"", "\"My name is {b},\" the {b.kind} said shyly."]);
    s.say(&["\"Do you want to {game} with me?\" asked {a}.", "\"Let's {game}!\" said {a}."]);
    s.say(&["{b} smiled and said yes.", "{b} jumped up. \"Yes, I love to {game}!\""]);
    s.say(&["They {played} until the sun went down.", "They {played} and laughed all afternoon."]);
    s.say(&[
        "When it was time to go, {a} said, \"Will you come back tomorrow?\" \"Yes!\" said {b}. \"We are friends now.\"",
        "Before {b} went home, {b.he} said, \"Thank you for playing with me, {a}.\"",
    ]);
    s.say(&[
        "{a} went home with a big smile. {a.He} was not lonely anymore.",
        "From that day on, {a} and {b} were best friends.",
    ]);
}

fn baking(s: &mut Story) {
    let food = s.any(FOODS);
    s.set("food", food);
    s.intro();
    s.say(&[
        "One morning, {a.his} {par} said, \"Today we will bake a {food}.\"",
        "It was a rainy day, so {a} and {a.his} {par} decided to bake a {food}.",
    ]);
    s.say(&[
        "{a} was very excited. {a.He} wanted to help.",
        "\"Can I help?\" asked {a}. \"Of course,\" said {a.his} {par}.",
    ]);
    s.say(&["First, they put flour and sugar in a big bowl.", "First, they got a big bowl, some flour and some milk."]);
    s.maybe(
        0.6,
        &[
            "Then {a} cracked an egg. Oops! It fell on the floor. Splat! {a} laughed, and {a.his} {par} laughed too.",
            "{a} got flour on {a.his} nose, and {a.his} {par} laughed.",
        ],
    );
    s.say(&["Next, {a} stirred and stirred until it was smooth.", "{a} mixed everything with a big spoon."]);
    s.say(&["They put the {food} in the oven and waited.", "Then the {food} went into the hot oven."]);
    s.say(&["Soon the house smelled sweet and warm.", "After a while, the whole kitchen smelled very good."]);
    s.say(&[
        "When the {food} was ready, {a} gave a piece to {b}. \"This is yummy!\" said {b}.",
        "{a} shared the {food} with {a.his} friend {b}, and they ate it all.",
    ]);
    s.say(&["{a} felt proud. Helping was fun.", "It was the best {food} {a} had ever eaten."]);
}

fn honesty(s: &mut Story) {
    let thing = s.any(FRAGILE);
    s.set("thing", thing);
    s.intro();
    s.say(&["One day, {a} was playing with a ball in the house.", "One rainy day, {a} was bouncing a ball inside."]);
    s.maybe(0.6, &["{a.His} {par} had said, \"Do not play with the ball inside.\""]);
    s.say(&[
        "The ball hit the {thing}, and it fell on the floor. Crash!",
        "Bump! The ball knocked over the {thing}, and it broke.",
    ]);
    s.say(&["{a} was scared. {a.He} wanted to hide.", "{a} looked at the pieces. What would {a.his} {par} say?"]);
    s.say(&[
        "Then {a.he} thought, \"I should tell the truth.\"",
        "{a} thought about hiding the pieces, but that did not feel right.",
    ]);
    s.say(&[
        "{a} went to {a.his} {par} and said, \"I am sorry. I broke the {thing}.\"",
        "\"I broke the {thing},\" {a} said in a small voice. \"I am sorry.\"",
    ]);
    s.say(&[
        "{a.His} {par} hugged {a.him}. \"Thank you for telling me the truth,\" {par.he} said. \"We can fix it together.\"",
        "{a.His} {par} was not angry. \"Things can break,\" {par.he} said. \"I am glad you told me.\"",
    ]);
    s.say(&["They cleaned up together.", "Together they glued the pieces back."]);
    s.say(&["{a} learned that telling the truth is always best.", "After that, {a} played with the ball outside."]);
}

fn adventure(s: &mut Story) {
    /// The day's weather and what the friends do in it.
    const DAYS: &[[&str; 2]] = &[
        ["sunny", "They found a little path that went into the trees."],
        ["snowy", "They built a snowman with a carrot nose and two stones for eyes."],
        ["rainy", "They put on their boots and jumped in every puddle."],
        ["windy", "They flew a kite high up in the sky."],
    ];
    let [weather, activity] = *DAYS.choose(s.rng).expect("not empty");
    let treasure = s.any(TREASURES);
    let spot = s.any(SPOTS);
    s.set("weather", weather);
    s.set("treasure", treasure);
    s.set("spot", spot);
    s.intro();
    s.say(&[
        "One {weather} day, {a} and {a.his} friend {b} went to {place}.",
        "It was a {weather} day. {a} and {b} the {b.kind} wanted to go on an adventure at {place}.",
    ]);
    s.say(&[activity]);
    s.say(&["Suddenly, they saw something {spot}.", "Then {b} pointed. \"Look! What is that {spot}?\""]);
    s.say(&["It was a {treasure}!", "They ran to see. It was a {treasure}."]);
    s.say(&["\"Wow!\" said {a}. \"What should we do with it?\"", "\"Who does it belong to?\" asked {b}."]);
    s.say(&[
        "\"Let's show it to my {par},\" said {a}.",
        "They asked everyone at {place}, and at last they found the old man who had lost it.",
    ]);
    s.say(&[
        "{a.His} {par} smiled and said, \"What a wonderful find!\"",
        "\"Thank you!\" said the old man. \"You are good children.\"",
    ]);
    s.say(&["It was the best day ever.", "{a} and {b} could not wait for their next adventure."]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_varied_and_complete() {
        let a = generate_stories(7, 600);
        assert_eq!(a, generate_stories(7, 600));
        assert_ne!(a, generate_stories(8, 600));
        let distinct: std::collections::HashSet<&String> = a.iter().collect();
        assert_eq!(distinct.len(), a.len(), "no story repeats in 600");
        for s in &a {
            assert!(!s.contains('{') && !s.contains('}'), "unfilled placeholder in: {s}");
            assert!(s.len() > 200 && s.ends_with(['.', '!', '"']), "{s}");
        }
        let bytes: usize = a.iter().map(String::len).sum();
        assert!(bytes / a.len() > 500, "stories average {} bytes", bytes / a.len());
        // Every plot appears.
        for opening in ["lost my", "sharing", "afraid of", "lonely", "bake", "broke", "adventure"] {
            assert!(a.iter().any(|s| s.contains(opening)), "no story mentions `{opening}`");
        }
    }
}

//! `when` conditions: a small expression language over upstream outputs.

use super::{parse_ref, OutputRef};

/// A `when` condition: comparisons of references and literals joined by `and`, `or`, `not`,
/// with parentheses. `steps.S.O` in a condition is written without braces.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    Literal(Operand),
    Compare(Operand, CmpOp, Operand),
    Not(Box<Condition>),
    And(Box<Condition>, Box<Condition>),
    Or(Box<Condition>, Box<Condition>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Ref(OutputRef),
    Number(f64),
    Text(String),
    Bool(bool),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    Number(f64),
    Text(String),
    Op(CmpOp),
    Open,
    Close,
}

fn tokenize(s: &str) -> std::result::Result<Vec<Token>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' => i += 1,
            '(' => {
                out.push(Token::Open);
                i += 1
            }
            ')' => {
                out.push(Token::Close);
                i += 1
            }
            '=' | '!' | '<' | '>' => {
                let two = chars.get(i + 1) == Some(&'=');
                let op = match (c, two) {
                    ('=', true) => CmpOp::Eq,
                    ('!', true) => CmpOp::Ne,
                    ('<', true) => CmpOp::Le,
                    ('>', true) => CmpOp::Ge,
                    ('<', false) => CmpOp::Lt,
                    ('>', false) => CmpOp::Gt,
                    _ => return Err(format!("{c:?} at {i}: comparisons are ==, !=, <, <=, >, >=")),
                };
                out.push(Token::Op(op));
                i += if two { 2 } else { 1 };
            }
            '"' | '\'' => {
                let end = chars[i + 1..].iter().position(|&d| d == c).ok_or_else(|| format!("a string opened at {i} is not closed"))?;
                out.push(Token::Text(chars[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            c if c.is_ascii_digit() || c == '-' || c == '.' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | '-' | '+')) {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                let n = text.parse::<f64>().ok().filter(|n| n.is_finite()).ok_or_else(|| format!("{text:?} is not a number"))?;
                out.push(Token::Number(n));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '-' | '.')) {
                    i += 1;
                }
                out.push(Token::Word(chars[start..i].iter().collect()));
            }
            other => return Err(format!("{other:?} at {i} is not part of a condition")),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }
    fn word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(x)) if x == w)
    }
    fn or(&mut self) -> std::result::Result<Condition, String> {
        let mut left = self.and()?;
        while self.word("or") {
            self.at += 1;
            left = Condition::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> std::result::Result<Condition, String> {
        let mut left = self.not()?;
        while self.word("and") {
            self.at += 1;
            left = Condition::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }
    fn not(&mut self) -> std::result::Result<Condition, String> {
        if self.word("not") {
            self.at += 1;
            return Ok(Condition::Not(Box::new(self.not()?)));
        }
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let inner = self.or()?;
            if self.peek() != Some(&Token::Close) {
                return Err("a ( is not closed".into());
            }
            self.at += 1;
            return Ok(inner);
        }
        let left = self.operand()?;
        if let Some(Token::Op(op)) = self.peek().cloned() {
            self.at += 1;
            let right = self.operand()?;
            return Ok(Condition::Compare(left, op, right));
        }
        Ok(Condition::Literal(left))
    }
    fn operand(&mut self) -> std::result::Result<Operand, String> {
        let t = self.peek().cloned().ok_or("the condition ends where a value was expected")?;
        self.at += 1;
        Ok(match t {
            Token::Number(n) => Operand::Number(n),
            Token::Text(s) => Operand::Text(s),
            Token::Word(w) if w == "true" => Operand::Bool(true),
            Token::Word(w) if w == "false" => Operand::Bool(false),
            Token::Word(w) if w.starts_with("steps.") => Operand::Ref(parse_ref(&w)?),
            Token::Word(w) => return Err(format!("{w:?}: a value is steps.STEP.OUTPUT, a number, a 'string', true or false")),
            other => return Err(format!("{other:?} where a value was expected")),
        })
    }
}

impl Condition {
    pub fn parse(s: &str) -> std::result::Result<Condition, String> {
        let mut p = Parser { tokens: tokenize(s)?, at: 0 };
        if p.tokens.is_empty() {
            return Err("empty".into());
        }
        let c = p.or()?;
        if p.at != p.tokens.len() {
            return Err(format!("{:?} after a whole condition", p.tokens[p.at]));
        }
        Ok(c)
    }

    pub fn references(&self) -> Vec<OutputRef> {
        let mut out = Vec::new();
        let mut todo = vec![self];
        while let Some(c) = todo.pop() {
            match c {
                Condition::Literal(a) => out.extend(a.reference()),
                Condition::Compare(a, _, b) => out.extend(a.reference().into_iter().chain(b.reference())),
                Condition::Not(x) => todo.push(x),
                Condition::And(a, b) | Condition::Or(a, b) => todo.extend([&**a, &**b]),
            }
        }
        out
    }

    /// True or false given the upstream outputs; an error names a missing output or a
    /// comparison that has no meaning (a number against text, an order of text).
    pub fn eval(&self, value: &dyn Fn(&OutputRef) -> Option<String>) -> std::result::Result<bool, String> {
        match self {
            Condition::Literal(a) => match a.resolve(value)? {
                Operand::Bool(b) => Ok(b),
                Operand::Text(t) if t == "true" || t == "false" => Ok(t == "true"),
                other => Err(format!("{other:?} is not true or false (compare it: == , >= ...)")),
            },
            Condition::Not(x) => Ok(!x.eval(value)?),
            Condition::And(a, b) => Ok(a.eval(value)? && b.eval(value)?),
            Condition::Or(a, b) => Ok(a.eval(value)? || b.eval(value)?),
            Condition::Compare(a, op, b) => {
                let (a, b) = (a.resolve(value)?, b.resolve(value)?);
                let ord = match (&a, &b) {
                    (Operand::Number(x), Operand::Number(y)) => x.partial_cmp(y).ok_or("NaN compared")?,
                    (Operand::Number(x), Operand::Text(t)) | (Operand::Text(t), Operand::Number(x)) => {
                        let y: f64 = t.parse().map_err(|_| format!("{t:?} is not a number, compared with {x}"))?;
                        let ord = x.partial_cmp(&y).ok_or("NaN compared")?;
                        if matches!(a, Operand::Number(_)) {
                            ord
                        } else {
                            ord.reverse()
                        }
                    }
                    (Operand::Text(x), Operand::Text(y)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => x.cmp(y),
                    (Operand::Bool(x), Operand::Bool(y)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => x.cmp(y),
                    (Operand::Bool(x), Operand::Text(t)) | (Operand::Text(t), Operand::Bool(x)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => x.to_string().as_str().cmp(t.as_str()),
                    _ => return Err(format!("{a:?} {op:?} {b:?} cannot be compared")),
                };
                use std::cmp::Ordering::*;
                Ok(match op {
                    CmpOp::Eq => ord == Equal,
                    CmpOp::Ne => ord != Equal,
                    CmpOp::Lt => ord == Less,
                    CmpOp::Le => ord != Greater,
                    CmpOp::Gt => ord == Greater,
                    CmpOp::Ge => ord != Less,
                })
            }
        }
    }
}

impl Operand {
    fn reference(&self) -> Option<OutputRef> {
        match self {
            Operand::Ref(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// A reference becomes its value (a number when it reads as one).
    fn resolve(&self, value: &dyn Fn(&OutputRef) -> Option<String>) -> std::result::Result<Operand, String> {
        match self {
            Operand::Ref(r) => {
                let v = value(r).ok_or_else(|| format!("{r}: step {:?} has no output {:?}", r.step, r.output))?;
                Ok(match v.parse::<f64>() {
                    Ok(n) if n.is_finite() => Operand::Number(n),
                    _ => Operand::Text(v),
                })
            }
            other => Ok(other.clone()),
        }
    }
}

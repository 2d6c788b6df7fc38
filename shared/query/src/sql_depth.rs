//! A bound on how deep a query's trees can get, checked on its tokens before any tree is built.
//!
//! sqlparser builds a chain like `0 + 1 + 1 + ...` or `a OR b OR ...` in a loop, so its
//! recursion limit (50, which does bound nested parentheses, subqueries and CASEs) never sees
//! it, yet the result is a tree as deep as the chain is long, and so is DataFusion's plan of it.
//! DataFusion's stack protection (`recursive_protection`) covers its optimizer's tree walks but
//! not `ExprSchemable::to_field` nor the `SchemaDisplay` that names a projected expression, both
//! recursive: a stack overflow there aborts the process, with no error to catch, and a job
//! definition that does it would abort every restart. Chained CTEs and long FROM lists do the
//! same in physical planning. The tokenizer is a flat loop, so counting on tokens is safe for
//! any input.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer, Word};

/// The deepest query accepted, in the levels `nesting_bound` counts. Measured on a debug build
/// (whose frames are the largest) on a 2 MiB tokio worker, tokio's default, through parsing,
/// logical and physical planning and execution: `SELECT 0 + 1 + ...` ran with 225 operators and
/// overflowed with 250 (8 KiB of stack per level in `to_field`); `||` chains overflowed at 300,
/// 200 chained CTEs (604 levels) and 200 tables in one FROM (405 levels) overflowed; 300 `OR`
/// terms (608 levels), 200 `UNION ALL` branches and a CASE of 200 branches ran. Half the lowest
/// overflow leaves room for heavier nodes per level. Chains this long take seconds to plan in a
/// debug build (planning is quadratic in them): 2,000 operators took 88 s.
pub const MAX_QUERY_NESTING: usize = 128;

/// Subqueries nested in subqueries (`(SELECT ... (SELECT ...))`): DataFusion's physical planning
/// of nested scalar subqueries doubles with every level. Measured in a debug build: 12 levels
/// planned and ran in 1 s, 16 in 15 s, 20 in 226 s (release builds are about ten times faster);
/// the parser refuses 24. Eight keeps a run's planning well under a second.
pub const MAX_SUBQUERY_NESTING: usize = 8;

/// Why a query was refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NestingError {
    #[error(
        "the query nests too deeply: about {levels} levels, at most {max} are accepted (each operator \
         or keyword in a chain like `a + b + c` or `x = 1 OR x = 2`, each joined table, CTE and UNION, \
         and each parenthesis or CASE counts one level); use IN (...) lists, fewer terms, or a \
         reference table to join instead of a long expression"
    )]
    TooDeep { levels: usize, max: usize },
    #[error(
        "the query nests too deeply: subqueries {levels} levels deep, at most {max} are accepted \
         (planning time doubles with each level); flatten them with CTEs or joins"
    )]
    SubqueriesTooDeep { levels: usize, max: usize },
    #[error("the query cannot be read: {0}")]
    Tokens(String),
}

/// Refuses a query whose trees could nest more than `max` levels.
pub fn check_nesting(sql: &str, max: usize) -> Result<(), NestingError> {
    let (levels, subquery_levels) = nesting_bounds(sql)?;
    if levels > max {
        return Err(NestingError::TooDeep { levels, max });
    }
    if subquery_levels > MAX_SUBQUERY_NESTING {
        return Err(NestingError::SubqueriesTooDeep { levels: subquery_levels, max: MAX_SUBQUERY_NESTING });
    }
    Ok(())
}

/// One parenthesised group while counting.
#[derive(Debug, Default)]
struct Group {
    /// Tokens in the current comma-separated item of this group.
    item_tokens: usize,
    /// The deepest group nested in the current item.
    item_child: usize,
    /// The deepest item so far.
    deepest: usize,
    /// After FROM or WITH, items are tables or CTEs that nest in the plan (each one a join or a
    /// view over the previous), so commas there do not separate independent items.
    commas_chain: bool,
    /// A `CASE ... END`: its branches are siblings, separated by WHEN, THEN and ELSE.
    case: bool,
    /// Holds a SELECT: a (sub)query, one level of subquery nesting.
    select: bool,
}

impl Group {
    fn close_item(&mut self) {
        self.deepest = self.deepest.max(self.item_tokens + self.item_child);
        self.item_tokens = 0;
        self.item_child = 0;
    }
}

/// An upper bound on the depth of any tree the query's parse or plan can hold: within a group of
/// parentheses (or a CASE), every operator and keyword of a comma-separated item may be one
/// level, plus the deepest group inside that item; names and literals are leaves. Lists whose
/// items are siblings (select lists, function arguments, IN lists, ORDER BY, CASE branches)
/// count their longest item, not their length.
pub fn nesting_bound(sql: &str) -> Result<usize, NestingError> {
    nesting_bounds(sql).map(|(levels, _)| levels)
}

/// [`nesting_bound`], and how deep groups holding a SELECT nest in each other.
fn nesting_bounds(sql: &str) -> Result<(usize, usize), NestingError> {
    let mut select_depth = 0;
    let mut max_select_depth = 0;
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|error| NestingError::Tokens(error.to_string()))?;
    let mut groups: Vec<Group> = vec![Group::default()];
    for token in tokens {
        match token {
            Token::Whitespace(_) | Token::EOF => {}
            Token::LParen | Token::LBracket | Token::LBrace => {
                if let Some(group) = groups.last_mut() {
                    group.item_tokens += 1;
                }
                groups.push(Group::default());
            }
            Token::RParen | Token::RBracket | Token::RBrace => {
                // An unbalanced closer is the parser's to report; the count stays an upper bound.
                if groups.len() > 1
                    && let Some(mut group) = groups.pop()
                {
                    if group.select {
                        select_depth -= 1;
                    }
                    group.close_item();
                    if let Some(parent) = groups.last_mut() {
                        parent.item_child = parent.item_child.max(group.deepest);
                    }
                }
            }
            Token::Comma => {
                if let Some(group) = groups.last_mut() {
                    if group.commas_chain {
                        group.item_tokens += 1;
                    } else {
                        group.close_item();
                    }
                }
            }
            // Operands are leaves: a name or a literal adds no level of its own.
            Token::Word(Word { keyword: Keyword::NoKeyword, .. })
            | Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::QuoteDelimitedStringLiteral(_)
            | Token::NationalQuoteDelimitedStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::Placeholder(_)
            | Token::Period
            | Token::SemiColon => {}
            Token::Word(Word { keyword: Keyword::CASE, .. }) => {
                if let Some(group) = groups.last_mut() {
                    group.item_tokens += 1;
                }
                groups.push(Group { case: true, ..Group::default() });
            }
            Token::Word(Word { keyword: Keyword::WHEN | Keyword::THEN | Keyword::ELSE, .. })
                if groups.last().is_some_and(|group| group.case) =>
            {
                if let Some(group) = groups.last_mut() {
                    group.close_item();
                }
            }
            Token::Word(Word { keyword: Keyword::END, .. })
                if groups.len() > 1 && groups.last().is_some_and(|group| group.case) =>
            {
                if let Some(mut group) = groups.pop() {
                    if group.select {
                        select_depth -= 1;
                    }
                    group.close_item();
                    if let Some(parent) = groups.last_mut() {
                        parent.item_child = parent.item_child.max(group.deepest);
                    }
                }
            }
            Token::Word(word) => {
                if let Some(group) = groups.last_mut() {
                    group.item_tokens += 1;
                    if word.keyword == Keyword::SELECT && !group.select {
                        group.select = true;
                        select_depth += 1;
                        max_select_depth = max_select_depth.max(select_depth);
                    }
                    match word.keyword {
                        Keyword::FROM | Keyword::WITH => group.commas_chain = true,
                        Keyword::SELECT
                        | Keyword::WHERE
                        | Keyword::GROUP
                        | Keyword::HAVING
                        | Keyword::ORDER
                        | Keyword::LIMIT
                        | Keyword::OFFSET
                        | Keyword::QUALIFY
                        | Keyword::WINDOW
                        | Keyword::VALUES => group.commas_chain = false,
                        _ => {}
                    }
                }
            }
            _ => {
                if let Some(group) = groups.last_mut() {
                    group.item_tokens += 1;
                }
            }
        }
    }
    // Unclosed groups (a syntax error the parser reports) still count.
    let mut depth = 0;
    while let Some(mut group) = groups.pop() {
        group.item_child = group.item_child.max(depth);
        group.close_item();
        depth = group.deepest;
    }
    Ok((depth, max_select_depth))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;

    fn chain(terms: usize, operator: &str) -> String {
        let mut sql = String::from("SELECT 0");
        for _ in 1..terms {
            sql.push_str(operator);
            sql.push('1');
        }
        sql
    }

    #[test]
    fn chains_count_one_level_per_operator_and_lists_their_longest_item() {
        assert!(nesting_bound(&chain(1_000, " + ")).unwrap() >= 1_000);
        assert!(nesting_bound(&chain(1_000, " OR 1 = ")).unwrap() >= 1_000);
        // A long select list or IN list is wide, not deep.
        let columns: Vec<String> = (0..5_000).map(|index| format!("c{index}")).collect();
        let wide = format!("SELECT {} FROM t WHERE x IN ({})", columns.join(", "), columns.join(", "));
        assert!(nesting_bound(&wide).unwrap() < 20, "{}", nesting_bound(&wide).unwrap());
        // Tables and CTEs after FROM and WITH nest in the plan, commas or not.
        let tables: Vec<String> = (0..1_000).map(|index| format!("t{index}")).collect();
        assert!(nesting_bound(&format!("SELECT 1 FROM {}", tables.join(", "))).unwrap() >= 1_000);
        let ctes: Vec<String> = (0..1_000).map(|index| format!("c{index} AS (SELECT 1)")).collect();
        assert!(nesting_bound(&format!("WITH {} SELECT 1", ctes.join(", "))).unwrap() >= 1_000);
        // CASE branches are siblings; a CASE in a CASE is a level.
        let branches: Vec<String> =
            (0..500).map(|index| format!("WHEN x = {index} THEN 'v{index}'")).collect();
        let case = format!("SELECT CASE {} ELSE 'none' END FROM t", branches.join(" "));
        assert!(nesting_bound(&case).unwrap() < 10, "{}", nesting_bound(&case).unwrap());
        let nested_case = format!("SELECT {}1{}", "CASE WHEN x THEN ".repeat(300), " END".repeat(300));
        assert!(nesting_bound(&nested_case).unwrap() >= 300);
        // Groups add their depth to the item holding them.
        assert_eq!(nesting_bound("SELECT ((1 + 2))").unwrap(), 4);
        assert!(nesting_bound(&format!("SELECT f(({}), 1)", chain(500, " * "))).unwrap() >= 500);
    }

    #[test]
    fn the_limit_refuses_past_it_and_accepts_at_it() {
        let sql = chain(2_000, " + ");
        let levels = nesting_bound(&sql).unwrap();
        assert!(check_nesting(&sql, levels).is_ok());
        let error = check_nesting(&sql, levels - 1).unwrap_err().to_string();
        assert!(error.contains(&format!("about {levels} levels")) && error.contains("at most"), "{error}");
        // Unbalanced or unterminated input is counted, never a panic.
        assert!(nesting_bound("SELECT ((1").unwrap() >= 3);
        assert!(nesting_bound("SELECT 1))) + 2").is_ok());
        assert!(matches!(check_nesting("SELECT 'open", 10), Err(NestingError::Tokens(_))));
    }

    #[test]
    fn subqueries_nest_at_most_eight_deep_and_side_by_side_count_once() {
        let nested = |depth: usize| format!("SELECT {}1{}", "(SELECT ".repeat(depth), ")".repeat(depth));
        // The outer query is one level.
        assert!(check_nesting(&nested(MAX_SUBQUERY_NESTING - 1), MAX_QUERY_NESTING).is_ok());
        let error = check_nesting(&nested(MAX_SUBQUERY_NESTING), MAX_QUERY_NESTING).unwrap_err();
        assert_eq!(
            error,
            NestingError::SubqueriesTooDeep { levels: MAX_SUBQUERY_NESTING + 1, max: MAX_SUBQUERY_NESTING }
        );
        assert!(error.to_string().contains("nests too deeply"), "{error}");
        // Siblings and CTEs are not nesting; a CASE or parenthesis between them does not hide it.
        let siblings = vec!["(SELECT 1)"; 50].join(" + ");
        assert!(check_nesting(&format!("SELECT {siblings}"), MAX_QUERY_NESTING).is_ok());
        let ctes: Vec<String> = (0..20).map(|index| format!("c{index} AS (SELECT 1)")).collect();
        assert!(check_nesting(&format!("WITH {} SELECT 1", ctes.join(", ")), MAX_QUERY_NESTING).is_ok());
        let hidden = format!("SELECT {}1{}", "((CASE WHEN (SELECT ".repeat(9), ") THEN 1 END))".repeat(9));
        assert!(matches!(
            check_nesting(&hidden, MAX_QUERY_NESTING),
            Err(NestingError::SubqueriesTooDeep { .. } | NestingError::TooDeep { .. })
        ));
    }
}

//! Bounds on what one run may take that DataFusion's memory pool does not see: the time a run
//! holds its slot, the size of its result, and the values that string, binary and list functions
//! build (`repeat('x', 400000000)` allocates 400 MB in one call, outside any pool).
//!
//! Functions that can build a value far larger than their inputs (`repeat`, `lpad`, `rpad`,
//! `replace`, `regexp_replace`, `array_repeat`, `array_resize`, `range`, `generate_series`) have
//! the size of what they would build estimated from their arguments before they run, and are
//! refused past the limit without allocating. Functions whose output is bounded by their inputs
//! times a small factor (`concat`, `overlay`, `translate`, `to_hex`, ...) are checked after
//! they ran: their inputs were bounded, so what they allocated is too, and nesting them cannot
//! double a value level after level.
//!
//! Why one file of about 630 lines of code: the size estimates before a call and the checks after
//! it must cover the same function list, argument by argument; one table of bounded functions and
//! their estimators, in one file, is how a new function cannot get one without the other.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use datafusion::arrow::compute::kernels::length::length;
use datafusion::arrow::compute::{cast, max};
use datafusion::arrow::datatypes::{DataType, Int64Type, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::udf_eq::UdfEq;
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature,
};
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;

use sluice_jobs::job::JobDefinition;

/// The longest timeout a job may ask for unless configured otherwise (`executor.max_timeout_ms`):
/// four hours, the longest a day's window of a large fleet took on one machine with room to spare.
pub const DEFAULT_MAX_TIMEOUT_MS: u64 = 14_400_000;

/// What one run may use besides the memory pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// The longest timeout a job may set.
    pub max_timeout: Duration,
    /// Rows of one result; 0: no limit.
    pub max_result_rows: u64,
    /// Bytes of one result file; 0: no limit.
    pub max_result_bytes: u64,
    /// One value built by a function; 0: no limit.
    pub max_value_bytes: usize,
    /// All values one function call builds for one batch; 0: no limit.
    pub max_function_output_bytes: usize,
}

impl Default for RunLimits {
    /// No bounds: for callers (tests, tools) that build a catalog without a config.
    fn default() -> Self {
        Self {
            max_timeout: Duration::MAX,
            max_result_rows: 0,
            max_result_bytes: 0,
            max_value_bytes: 0,
            max_function_output_bytes: 0,
        }
    }
}

impl RunLimits {
    /// Refuses a job whose `timeout` is more than this executor lets one run hold a slot.
    pub fn check_definition(&self, definition: &JobDefinition) -> Result<(), String> {
        let Some(timeout_micros) = definition.timeout_micros_opt else { return Ok(()) };
        let asked = Duration::from_micros(u64::try_from(timeout_micros).unwrap_or(0));
        if asked > self.max_timeout {
            return Err(format!(
                "timeout {} is more than this executor allows: at most {} (executor.max_timeout_ms = {}); \
                 ask for at most that, or split the window",
                describe_duration(asked),
                describe_duration(self.max_timeout),
                self.max_timeout.as_millis()
            ));
        }
        Ok(())
    }

    /// The reason a result of `rows` rows and `bytes` bytes is refused, if it is.
    pub fn check_result(&self, rows: u64, bytes: u64) -> Result<(), String> {
        if self.max_result_rows > 0 && rows > self.max_result_rows {
            return Err(format!(
                "the result has more than {} rows (query.max_result_rows); aggregate further, \
                 add a LIMIT or use a shorter window",
                self.max_result_rows
            ));
        }
        if self.max_result_bytes > 0 && bytes > self.max_result_bytes {
            return Err(format!(
                "the result is larger than {} bytes (query.max_result_bytes); aggregate further, \
                 select fewer columns or use a shorter window",
                self.max_result_bytes
            ));
        }
        Ok(())
    }
}

/// `4h`, `90s`, `1500ms`: the way job headers write durations.
fn describe_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if duration == Duration::MAX {
        "unlimited".to_string()
    } else if millis.is_multiple_of(3_600_000) && millis > 0 {
        format!("{}h", millis / 3_600_000)
    } else if millis.is_multiple_of(60_000) && millis > 0 {
        format!("{}m", millis / 60_000)
    } else if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// How a function's output size is known before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Estimate {
    /// `repeat(text, count)`: length times count.
    Repeat,
    /// `lpad`/`rpad(text, length, ...)`: the length asked for (characters).
    Pad,
    /// `replace(text, from, to)`: every `from` replaced (an empty `from` matches between
    /// characters).
    Replace,
    /// `regexp_replace(text, pattern, replacement, ...)`: a match at every position, and each
    /// back reference in the replacement at most the whole text.
    RegexpReplace,
    /// `array_repeat(element, count)`, `array_resize(list, count, ...)`: count elements.
    CountSecond,
    /// `range`/`generate_series(start, stop, step)` over integers or times.
    Series,
    /// Output bounded by the inputs: checked after the call.
    Inputs,
}

/// The functions bounded, by name (aliases resolve to the same function).
const BOUNDED_FUNCTIONS: &[(&str, Estimate)] = &[
    ("repeat", Estimate::Repeat),
    ("lpad", Estimate::Pad),
    ("rpad", Estimate::Pad),
    ("replace", Estimate::Replace),
    ("regexp_replace", Estimate::RegexpReplace),
    ("array_repeat", Estimate::CountSecond),
    ("array_resize", Estimate::CountSecond),
    ("range", Estimate::Series),
    ("generate_series", Estimate::Series),
    ("concat", Estimate::Inputs),
    ("concat_ws", Estimate::Inputs),
    ("overlay", Estimate::Inputs),
    ("translate", Estimate::Inputs),
    ("to_hex", Estimate::Inputs),
    ("encode", Estimate::Inputs),
    ("array_concat", Estimate::Inputs),
    ("array_append", Estimate::Inputs),
    ("array_prepend", Estimate::Inputs),
    ("make_array", Estimate::Inputs),
    ("array_union", Estimate::Inputs),
    ("string_to_array", Estimate::Inputs),
    ("upper", Estimate::Inputs),
    ("lower", Estimate::Inputs),
    ("initcap", Estimate::Inputs),
];

/// Replaces the value-building functions of `ctx` with bounded ones. Planning sees them too:
/// constant folding of `repeat('x', 400000000)` is refused like its execution.
pub fn bound_value_building_functions(ctx: &SessionContext, limits: &RunLimits) {
    if limits.max_value_bytes == 0 && limits.max_function_output_bytes == 0 {
        return;
    }
    let functions = ctx.state().scalar_functions().clone();
    for (name, estimate) in BOUNDED_FUNCTIONS {
        let Some(function) = functions.get(*name) else { continue };
        if function.inner().downcast_ref::<BoundedFunction>().is_some() {
            continue;
        }
        let bounded = BoundedFunction {
            inner: Arc::clone(function.inner()).into(),
            estimate: *estimate,
            max_value_bytes: limits.max_value_bytes,
            max_output_bytes: limits.max_function_output_bytes,
        };
        ctx.register_udf(ScalarUDF::new_from_impl(bounded));
    }
}

/// The names of the functions bounded, for tests and docs.
pub fn bounded_function_names() -> impl Iterator<Item = &'static str> {
    BOUNDED_FUNCTIONS.iter().map(|(name, _)| *name)
}

/// A function that refuses to build values past the limits, delegating everything else.
#[derive(Debug, PartialEq, Eq, Hash)]
struct BoundedFunction {
    inner: UdfEq<Arc<dyn ScalarUDFImpl>>,
    estimate: Estimate,
    max_value_bytes: usize,
    max_output_bytes: usize,
}

impl BoundedFunction {
    /// Another function under the same limits.
    fn bounding(&self, inner: &Arc<dyn ScalarUDFImpl>, estimate: Estimate) -> Self {
        Self {
            inner: Arc::clone(inner).into(),
            estimate,
            max_value_bytes: self.max_value_bytes,
            max_output_bytes: self.max_output_bytes,
        }
    }

    fn too_large(&self, what: &str, bytes: u128, limit: usize, key: &str) -> DataFusionError {
        DataFusionError::ResourcesExhausted(format!(
            "{}() would build {what} of {bytes} bytes; at most {limit} bytes are allowed ({key})",
            self.inner.name()
        ))
    }

    /// `expr` with every call of a bounded function's unbounded original replaced.
    fn rebound(&self, expr: Expr) -> Result<Expr> {
        expr.transform_up(|node| match node {
            Expr::ScalarFunction(call) if call.func.inner().downcast_ref::<Self>().is_none() => {
                let Some((_, estimate)) =
                    BOUNDED_FUNCTIONS.iter().find(|(name, _)| *name == call.func.name())
                else {
                    return Ok(Transformed::no(Expr::ScalarFunction(call)));
                };
                let bounded = self.bounding(call.func.inner(), *estimate);
                Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(
                    Arc::new(ScalarUDF::new_from_impl(bounded)),
                    call.args,
                ))))
            }
            other => Ok(Transformed::no(other)),
        })
        .map(|transformed| transformed.data)
    }

    /// Refuses the call if what it would build, estimated from its arguments, is past a limit.
    fn check_before(&self, args: &ScalarFunctionArgs) -> Result<()> {
        let Some(sizes) = estimate_sizes(self.estimate, &args.args, args.number_rows)? else {
            return Ok(());
        };
        self.check_sizes(&sizes)
    }

    fn check_sizes(&self, sizes: &[u128]) -> Result<()> {
        self.check_value(sizes.iter().copied().max().unwrap_or(0))?;
        self.check_batch(sizes.iter().sum())
    }

    /// The largest single value against `query.max_value_bytes` (0: no limit).
    fn check_value(&self, bytes: u128) -> Result<()> {
        if self.max_value_bytes > 0 && bytes > self.max_value_bytes as u128 {
            return Err(self.too_large("a value", bytes, self.max_value_bytes, "query.max_value_bytes"));
        }
        Ok(())
    }

    /// All values of one batch against `query.max_function_output_bytes` (0: no limit).
    fn check_batch(&self, bytes: u128) -> Result<()> {
        if self.max_output_bytes > 0 && bytes > self.max_output_bytes as u128 {
            return Err(self.too_large(
                "values for one batch",
                bytes,
                self.max_output_bytes,
                "query.max_function_output_bytes",
            ));
        }
        Ok(())
    }

    /// Checks what the call built: for functions bounded by their inputs, and as a backstop for
    /// estimates (a padded character may take four bytes).
    fn check_after(&self, output: &ColumnarValue) -> Result<()> {
        match output {
            ColumnarValue::Scalar(value) => self.check_value(scalar_value_bytes(value)),
            ColumnarValue::Array(array) => {
                // Finding the largest value walks the array: skip it when there is no limit.
                if self.max_value_bytes > 0
                    && let Some(largest) = largest_value_bytes(array.as_ref())?
                {
                    self.check_value(largest)?;
                }
                self.check_batch(array.get_buffer_memory_size() as u128)
            }
        }
    }
}

/// The bytes of a scalar's value, without the scalar's own struct.
fn scalar_value_bytes(value: &ScalarValue) -> u128 {
    match value {
        ScalarValue::Utf8(Some(text))
        | ScalarValue::LargeUtf8(Some(text))
        | ScalarValue::Utf8View(Some(text)) => text.len() as u128,
        ScalarValue::Binary(Some(bytes))
        | ScalarValue::LargeBinary(Some(bytes))
        | ScalarValue::BinaryView(Some(bytes)) => bytes.len() as u128,
        other => other.size().saturating_sub(std::mem::size_of::<ScalarValue>()) as u128,
    }
}

/// The largest string or binary value of `array`; none for other types (their total is checked).
fn largest_value_bytes(array: &dyn Array) -> Result<Option<u128>> {
    match array.data_type() {
        DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView => {
            let lengths = cast(&length(array)?, &DataType::Int64)?;
            Ok(max(lengths.as_primitive::<Int64Type>()).map(|bytes| bytes.max(0) as u128))
        }
        _ => Ok(None),
    }
}

/// One argument as per-row integers: a scalar stands for every row.
enum Values {
    Scalar(Option<i64>),
    Array(Int64Array),
}

impl Values {
    fn get(&self, row: usize) -> Option<i64> {
        match self {
            Self::Scalar(value) => *value,
            Self::Array(array) => array.is_valid(row).then(|| array.value(row)),
        }
    }
}

/// Byte lengths of a string or binary argument; none when it is of another type.
fn byte_lengths(value: &ColumnarValue) -> Result<Option<Values>> {
    let array = match value {
        ColumnarValue::Scalar(scalar) => scalar.to_array_of_size(1)?,
        ColumnarValue::Array(array) => Arc::clone(array),
    };
    if largest_value_bytes(array.as_ref())?.is_none() {
        return Ok(None);
    }
    let lengths = cast(&length(array.as_ref())?, &DataType::Int64)?;
    Ok(Some(as_values(value, lengths.as_primitive::<Int64Type>().clone())))
}

/// An integer (or time, as microseconds) argument; none when it is of another type.
fn integers(value: &ColumnarValue) -> Result<Option<Values>> {
    let array: ArrayRef = match value {
        ColumnarValue::Scalar(scalar) => scalar.to_array_of_size(1)?,
        ColumnarValue::Array(array) => Arc::clone(array),
    };
    let as_integers = match array.data_type() {
        data_type if data_type.is_integer() => cast(&array, &DataType::Int64)?,
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _) => {
            let micros = cast(&array, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
            cast(&micros, &DataType::Int64)?
        }
        _ => return Ok(None),
    };
    Ok(Some(as_values(value, as_integers.as_primitive::<Int64Type>().clone())))
}

fn as_values(value: &ColumnarValue, array: Int64Array) -> Values {
    match value {
        ColumnarValue::Scalar(_) => Values::Scalar(array.is_valid(0).then(|| array.value(0))),
        ColumnarValue::Array(_) => Values::Array(array),
    }
}

/// A `range`/`generate_series` step in microseconds (times) or units (integers); none when it
/// cannot be told, e.g. a step in months.
fn step_of(value: Option<&ColumnarValue>, row: usize, times: bool) -> Result<Option<i128>> {
    let Some(value) = value else { return Ok(Some(if times { 0 } else { 1 })) };
    if let ColumnarValue::Scalar(ScalarValue::IntervalMonthDayNano(Some(interval))) = value {
        if interval.months != 0 {
            return Ok(None);
        }
        let micros = i128::from(interval.days) * 86_400_000_000 + i128::from(interval.nanoseconds) / 1000;
        return Ok(Some(micros));
    }
    if let ColumnarValue::Scalar(ScalarValue::IntervalDayTime(Some(interval))) = value {
        return Ok(Some(
            i128::from(interval.days) * 86_400_000_000 + i128::from(interval.milliseconds) * 1000,
        ));
    }
    Ok(integers(value)?.and_then(|values| values.get(row)).map(i128::from))
}

/// Per-row bytes the function would build, or none when the arguments do not tell.
fn estimate_sizes(
    estimate: Estimate,
    args: &[ColumnarValue],
    number_rows: usize,
) -> Result<Option<Vec<u128>>> {
    let all_scalar = args.iter().all(|arg| matches!(arg, ColumnarValue::Scalar(_)));
    let rows = if all_scalar { 1 } else { number_rows };
    let clamp = |value: Option<i64>| u128::try_from(value.unwrap_or(0).max(0)).unwrap_or(0);
    let sizes = match estimate {
        Estimate::Inputs => return Ok(None),
        Estimate::Repeat | Estimate::Pad | Estimate::CountSecond => {
            let (Some(first), Some(second)) = (args.first(), args.get(1)) else { return Ok(None) };
            let Some(counts) = integers(second)? else { return Ok(None) };
            let lengths = match estimate {
                Estimate::Repeat => match byte_lengths(first)? {
                    Some(lengths) => Some(lengths),
                    None => return Ok(None),
                },
                // A list element (or a padded character) costs at least a byte; arrays of
                // 8-byte numbers are caught by the check after the call.
                _ => None,
            };
            (0..rows)
                .map(|row| {
                    let each = lengths.as_ref().map_or(1, |lengths| clamp(lengths.get(row)));
                    each.saturating_mul(clamp(counts.get(row)))
                })
                .collect()
        }
        Estimate::Replace | Estimate::RegexpReplace => {
            let (Some(text), Some(pattern), Some(to)) = (args.first(), args.get(1), args.get(2)) else {
                return Ok(None);
            };
            let (Some(texts), Some(patterns), Some(tos)) =
                (byte_lengths(text)?, byte_lengths(pattern)?, byte_lengths(to)?)
            else {
                return Ok(None);
            };
            (0..rows)
                .map(|row| {
                    let text = clamp(texts.get(row));
                    let to = clamp(tos.get(row));
                    let replacements = match estimate {
                        Estimate::Replace => text / clamp(patterns.get(row)).max(1) + 1,
                        _ => text + 1,
                    };
                    let back_references = match estimate {
                        Estimate::RegexpReplace => (to / 2).saturating_mul(text),
                        _ => 0,
                    };
                    text.saturating_add(replacements.saturating_mul(to)).saturating_add(back_references)
                })
                .collect()
        }
        Estimate::Series => {
            let (Some(start), Some(stop)) = (args.first(), args.get(1)) else {
                // `range(n)`: from 0 to n.
                let Some(stop) = args.first() else { return Ok(None) };
                let Some(stops) = integers(stop)? else { return Ok(None) };
                return Ok(Some((0..rows).map(|row| clamp(stops.get(row)).saturating_mul(8)).collect()));
            };
            let times = !start.data_type().is_integer();
            let (Some(starts), Some(stops)) = (integers(start)?, integers(stop)?) else { return Ok(None) };
            let mut sizes = Vec::with_capacity(rows);
            for row in 0..rows {
                let (Some(first), Some(last)) = (starts.get(row), stops.get(row)) else {
                    sizes.push(0);
                    continue;
                };
                let Some(step) = step_of(args.get(2), row, times)? else { return Ok(None) };
                // A time series without a step is a day apart; a zero step is refused by the
                // function itself.
                let step = if times && step == 0 { 86_400_000_000 } else { step };
                if step == 0 {
                    sizes.push(0);
                    continue;
                }
                let count = (i128::from(last) - i128::from(first)) / step + 1;
                sizes.push(u128::try_from(count.max(0)).unwrap_or(0).saturating_mul(8));
            }
            sizes
        }
    };
    Ok(Some(sizes))
}

#[warn(clippy::missing_trait_methods)]
impl ScalarUDFImpl for BoundedFunction {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        #[expect(deprecated, reason = "delegated as DataFusion's own wrappers do")]
        self.inner.display_name(args)
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(
        &self,
        args: ReturnFieldArgs<'_>,
    ) -> Result<datafusion::arrow::datatypes::FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_nullable(&self, args: &[Expr], schema: &dyn datafusion::common::ExprSchema) -> bool {
        #[expect(deprecated, reason = "delegated as DataFusion's own wrappers do")]
        self.inner.is_nullable(args, schema)
    }

    fn is_strict(&self) -> bool {
        self.inner.is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        self.check_before(&args)?;
        let output = self.inner.invoke_with_args(args)?;
        self.check_after(&output)?;
        Ok(output)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        let updated = self.inner.with_updated_config(config)?;
        Some(ScalarUDF::new_from_impl(self.bounding(updated.inner(), self.estimate)))
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        // `concat` simplifies into a new call of DataFusion's own `concat`: that call must be
        // bounded again.
        match self.inner.simplify(args, info)? {
            ExprSimplifyResult::Simplified(expr) => Ok(ExprSimplifyResult::Simplified(self.rebound(expr)?)),
            original => Ok(original),
        }
    }

    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &SimplifyContext,
    ) -> Result<datafusion::logical_expr::preimage::PreimageResult> {
        self.inner.preimage(args, lit_expr, info)
    }

    fn conditional_arguments<'a>(&self, args: &'a [Expr]) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.conditional_arguments(args)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn evaluate_bounds(
        &self,
        input: &[&datafusion::logical_expr::interval_arithmetic::Interval],
    ) -> Result<datafusion::logical_expr::interval_arithmetic::Interval> {
        self.inner.evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &datafusion::logical_expr::interval_arithmetic::Interval,
        inputs: &[&datafusion::logical_expr::interval_arithmetic::Interval],
    ) -> Result<Option<Vec<datafusion::logical_expr::interval_arithmetic::Interval>>> {
        self.inner.propagate_constraints(interval, inputs)
    }

    fn struct_field_mapping(
        &self,
        literal_args: &[Option<ScalarValue>],
    ) -> Option<datafusion::logical_expr::StructFieldMapping> {
        self.inner.struct_field_mapping(literal_args)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(
        &self,
        args: &[datafusion::logical_expr::ExpressionPlacement],
    ) -> datafusion::logical_expr::ExpressionPlacement {
        self.inner.placement(args)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use datafusion::arrow::array::Int64Array;

    use super::*;

    const LIMIT: usize = 1024 * 1024;

    fn bounded_context() -> SessionContext {
        let ctx = SessionContext::new();
        let limits = RunLimits {
            max_value_bytes: LIMIT,
            max_function_output_bytes: 8 * LIMIT,
            ..RunLimits::default()
        };
        bound_value_building_functions(&ctx, &limits);
        ctx
    }

    async fn run(ctx: &SessionContext, sql: &str) -> Result<Vec<datafusion::arrow::array::RecordBatch>> {
        ctx.sql(sql).await?.collect().await
    }

    async fn first_i64(ctx: &SessionContext, sql: &str) -> i64 {
        let batches = run(ctx, sql).await.unwrap_or_else(|error| panic!("{sql}: {error}"));
        let column = batches[0].column(0);
        cast(column, &DataType::Int64).unwrap().as_any().downcast_ref::<Int64Array>().unwrap().value(0)
    }

    #[test]
    fn every_bounded_function_exists_in_a_session() {
        let ctx = SessionContext::new();
        let functions = ctx.state().scalar_functions().clone();
        for name in bounded_function_names() {
            assert!(functions.contains_key(name), "{name} is a DataFusion function");
        }
    }

    #[tokio::test]
    async fn values_up_to_the_limit_are_built_and_larger_ones_refused_before_allocating() {
        let ctx = bounded_context();
        assert_eq!(first_i64(&ctx, &format!("SELECT length(repeat('x', {LIMIT}))")).await, LIMIT as i64);
        for sql in [
            "SELECT length(repeat('x', 400000000))".to_string(),
            format!("SELECT length(repeat('x', {}))", LIMIT + 1),
            "SELECT length(repeat('ab', 9223372036854775807))".to_string(),
            "SELECT length(lpad('x', 400000000))".to_string(),
            "SELECT length(rpad('x', 400000000, 'yz'))".to_string(),
            "SELECT cardinality(range(1, 9223372036854775807))".to_string(),
            "SELECT cardinality(generate_series(-9223372036854775807, 9223372036854775807))".to_string(),
            "SELECT cardinality(range(TIMESTAMP '1970-01-01', TIMESTAMP '2100-01-01', INTERVAL '1 second'))"
                .to_string(),
            "SELECT cardinality(array_repeat(1, 400000000))".to_string(),
            "SELECT length(replace(repeat('x', 1000000), 'x', 'yyyyyy'))".to_string(),
            "SELECT length(regexp_replace(repeat('x', 100000), '', 'yyyyyyyyyyyy', 'g'))".to_string(),
        ] {
            let error = run(&ctx, &sql).await.expect_err(&sql).to_string();
            assert!(error.contains("query.max_value_bytes"), "{sql}: {error}");
        }
        // Column inputs are estimated per row, and all rows of a batch together.
        let error = run(
            &ctx,
            "SELECT length(repeat(CAST(value % 2 AS VARCHAR), 2000)) FROM generate_series(1, 8192)",
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(error.contains("query.max_function_output_bytes"), "{error}");
        assert_eq!(
            first_i64(&ctx, "SELECT max(length(repeat('x', value))) FROM generate_series(1, 1000)").await,
            1000
        );
    }

    #[tokio::test]
    async fn nested_concatenation_cannot_double_a_value_past_the_limit() {
        let ctx = bounded_context();
        let half = LIMIT / 2;
        assert_eq!(
            first_i64(&ctx, &format!("SELECT length(concat(repeat('x', {half}), repeat('y', {half})))"))
                .await,
            LIMIT as i64
        );
        let mut sql = format!("repeat(CAST(value AS VARCHAR), {half})");
        for _ in 0..4 {
            sql = format!("concat({sql}, {sql})");
        }
        let error = run(&ctx, &format!("SELECT length({sql}) FROM generate_series(1, 3)"))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("concat() would build a value"), "{error}");
    }

    /// Aggregates that build one value from many rows are not wrapped: they account what they
    /// hold to the memory pool, whose limit stops them.
    #[tokio::test]
    async fn aggregated_values_are_bounded_by_the_memory_pool() {
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_limit(64 * 1024 * 1024, 1.0)
            .build_arc()
            .unwrap();
        let ctx = SessionContext::new_with_config_rt(datafusion::prelude::SessionConfig::new(), runtime);
        for aggregate in ["string_agg(repeat('x', 1000), ',')", "array_agg(repeat('x', 1000))"] {
            let sql = format!("SELECT length(CAST({aggregate} AS VARCHAR)) FROM generate_series(1, 200000)");
            let error = run(&ctx, &sql).await.expect_err(&sql).to_string();
            assert!(error.contains("Resources exhausted"), "{sql}: {error}");
        }
    }

    #[test]
    fn timeouts_past_the_maximum_are_refused_with_the_maximum() {
        let limits = RunLimits { max_timeout: Duration::from_secs(4 * 3600), ..RunLimits::default() };
        let job = |timeout: &str| {
            JobDefinition::parse(&format!("-- name: j\n-- window: 1h\n-- timeout: {timeout}\nSELECT 1"), None)
                .unwrap()
        };
        assert!(limits.check_definition(&job("4h")).is_ok());
        let error = limits.check_definition(&job("3650d")).unwrap_err();
        assert!(error.contains("at most 4h") && error.contains("executor.max_timeout_ms"), "{error}");
        assert!(limits.check_definition(&job("14400001ms")).is_err());
    }

    #[test]
    fn results_are_refused_one_past_each_limit() {
        let limits = RunLimits { max_result_rows: 10, max_result_bytes: 100, ..RunLimits::default() };
        assert!(limits.check_result(10, 100).is_ok());
        assert!(limits.check_result(11, 0).unwrap_err().contains("query.max_result_rows"));
        assert!(limits.check_result(0, 101).unwrap_err().contains("query.max_result_bytes"));
        assert!(RunLimits::default().check_result(u64::MAX, u64::MAX).is_ok());
    }
}

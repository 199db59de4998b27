// Usage metering inside nginx (njs 0.7, Debian bookworm's libnginx-mod-http-js),
// for deploy/nginx/quotameter.conf. One piece per point of the request:
//
//   admit         (js_content) lets nginx read the body, copies it for the
//                 check, and hands the request on to the location that admits;
//   upstreamBody  (js_set, proxy_set_body) names the fallback model the check
//                 degraded the request to, and asks a stream for
//                 stream_options.include_usage, as the shim does, so it ends
//                 with the upstream's usage chunk;
//   header / body (js_header_filter, js_body_filter) read the usage and the
//                 served model from the answer as it passes, into js_var
//                 variables, and keep the completion text passed to the
//                 client; a usage chunk the client did not ask for is taken
//                 out of its stream;
//   report        (js_set, in the post_action location) turns those variables
//                 into the CloudEvent that POST /v1/events takes under the
//                 check's event id, which settles the check's reservation.
//                 Without usage (the client left mid-stream, so the upstream
//                 was closed before its usage chunk; a model that reports
//                 none), it carries the text the client was passed, which the
//                 shim counts (gateway_shim/counted_reports.py).
//
// A filter may not wait (no ngx.fetch, no subrequest in njs 0.7 filters), and
// each request's VM ends with it: what the report needs goes through request
// variables, which survive into the post_action location.

var NULL_USAGE = /,\s*"usage"\s*:\s*null/g;
var JSON_LIMIT = 16 * 1024 * 1024; // a JSON answer is kept (to read its usage) up to this size
// The delivered text kept for a report without usage: this many bytes of it as
// JSON (escapes counted), so the report stays far below shim.ingest_max_bytes
// (1 MiB). Past it only the bytes are counted, and the shim scales the start's
// tokens to them. Kept in slices, so a long text is cut near the bound.
var TEXT_LIMIT = 256 * 1024;
var TEXT_SLICE = 4096;
var TEXT_SLOTS = 18; // $qm_text_0 .. $qm_text_17 in quotameter.conf

function isObject(value) {
    return value !== null && typeof value === 'object' && !Array.isArray(value);
}

function count(value) {
    return typeof value === 'number' && value >= 0 && value % 1 === 0 ? value : 0;
}

// The API the request speaks, from its path, as the shim's routes tell them apart
// (gateway_shim/dialects/): OpenAI's chat and completions, its Responses API, or
// Anthropic's Messages API. Only chat and completions need asking for usage in a
// stream; the other two always end theirs with it.
function apiOf(r) {
    var path = String(r.uri || '').replace(/\/+$/, '');
    if (/\/messages$/.test(path)) {
        return 'messages';
    }
    return /\/responses$/.test(path) ? 'responses' : 'chat';
}

// js_content of /v1/: nginx has read the body by now (auth_request's access
// phase comes before it is read). The check's subrequest sees no body of its
// own, so a copy goes through a variable, which subrequests share.
function admit(r) {
    var raw = r.requestBuffer;
    r.variables.qm_check_body = raw === undefined ? '' : raw.toString();
    r.internalRedirect('@quotameter_model');
}

// js_set $qm_upstream_body: the body sent to the model. Only two change: one the
// check degraded to the tier's fallback model (which it names), and a stream
// without include_usage; every other body goes byte for byte.
function upstreamBody(r) {
    var raw = r.requestBuffer;
    if (raw === undefined) {
        return '';
    }
    var text = raw.toString();
    var body;
    try {
        body = JSON.parse(text);
    } catch (e) {
        return text; // not ours to judge: the model answers it
    }
    if (!isObject(body)) {
        return text;
    }
    if (typeof body.model === 'string') {
        r.variables.qm_model_requested = body.model;
    }
    var fallback = r.variables.qm_fallback;
    var changed = Boolean(fallback) && body.model !== fallback;
    if (changed) {
        body.model = fallback;
    }
    if (body.stream === true) {
        r.variables.qm_streamed = '1';
    }
    if (body.stream === true && apiOf(r) === 'chat') {
        var options = body.stream_options;
        if (!isObject(options) || options.include_usage !== true) {
            r.variables.qm_hide_usage = '1';
            if (!changed && options === undefined) {
                // Added in front, so the client's own bytes follow unchanged.
                return '{"stream_options":{"include_usage":true},' + text.slice(text.indexOf('{') + 1);
            }
            body.stream_options = isObject(options) ? options : {};
            body.stream_options.include_usage = true;
            changed = true;
        }
    }
    return changed ? JSON.stringify(body) : text;
}

// Per request: njs 0.7 gives each request a VM of its own.
var sse = false;
var json = false;
var hide = false;
var tail = Buffer.alloc(0);
var kept = [];
var keptBytes = 0;
var passed = ''; // this buffer's completion text, as passed on
var runs = []; // the text kept so far (see keepText)
var runCount = 0;
var textBytes = 0;
var textRoom = TEXT_LIMIT;
var textFull = false;
var api = 'chat'; // set by header()
var messageUsage = {}; // Anthropic: message_start's usage, then message_delta's on top

function header(r) {
    api = apiOf(r);
    r.variables.qm_upstream_status = String(r.status);
    var type = String(r.headersOut['Content-Type'] || '').toLowerCase();
    sse = type.indexOf('text/event-stream') === 0;
    json = type.indexOf('json') >= 0;
    hide = sse && r.variables.qm_hide_usage === '1';
    if (hide) {
        delete r.headersOut['Content-Length']; // the stream loses its usage chunk
    }
}

function note(r, document) {
    if (!isObject(document)) {
        return;
    }
    // Responses stream events nest the response, Anthropic's message_start the message.
    var whole = isObject(document.response) ? document.response
        : (isObject(document.message) ? document.message : document);
    if (!r.variables.qm_model_served && typeof whole.model === 'string' && whole.model) {
        r.variables.qm_model_served = whole.model;
    }
    if (api === 'messages') {
        noteMessageUsage(r, document);
        return;
    }
    var usage = document.usage;
    if (!isObject(usage) && isObject(document.response)) {
        usage = document.response.usage; // Responses API stream events nest it
    }
    if (!isObject(usage)) {
        return;
    }
    var input = usage.prompt_tokens_details || usage.input_tokens_details || {};
    var output = usage.completion_tokens_details || usage.output_tokens_details || {};
    r.variables.qm_usage = JSON.stringify({
        input_tokens: count(usage.prompt_tokens !== undefined ? usage.prompt_tokens : usage.input_tokens),
        output_tokens: count(usage.completion_tokens !== undefined ? usage.completion_tokens : usage.output_tokens),
        cached_tokens: isObject(input) ? count(input.cached_tokens) : 0,
        reasoning_tokens: isObject(output) ? count(output.reasoning_tokens) : 0,
    });
}

// Anthropic's usage: a JSON Message carries it whole; a stream splits it between
// message_start (input, cache) and message_delta (the output so far, cumulative).
// A stream's is final only from a message_delta: a client that leaves before is
// billed from the text it was passed. Anthropic counts cache reads and writes
// outside input_tokens; the event counts them inside (gateway_shim/anthropic_messages.py).
function noteMessageUsage(r, document) {
    var usage = document.type === 'message_start' && isObject(document.message)
        ? document.message.usage : document.usage;
    if (!isObject(usage)) {
        return;
    }
    Object.keys(usage).forEach(function(field) {
        if (typeof usage[field] === 'number') {
            messageUsage[field] = usage[field];
        }
    });
    if (document.type !== 'message_delta' && document.type !== 'message') {
        return;
    }
    var read = count(messageUsage.cache_read_input_tokens);
    var written = count(messageUsage.cache_creation_input_tokens);
    r.variables.qm_usage = JSON.stringify({
        input_tokens: count(messageUsage.input_tokens) + read + written,
        output_tokens: count(messageUsage.output_tokens),
        cached_tokens: read,
        cache_write_tokens: written,
        reasoning_tokens: 0,
    });
}

// One whole SSE event: noted, and what of it the client gets ('' for nothing).
function event(r, text) {
    // Split on a string, not /\r?\n/: njs 0.7 kept about 1 MB per regex split until the
    // request ended (2.4 GB for a stream of 2000 events); a '\r' is dropped by hand.
    var data = text.split('\n').filter(function(line) { return line.indexOf('data:') === 0; })
        .map(function(line) {
            var end = line.charAt(line.length - 1) === '\r' ? line.length - 1 : line.length;
            return line.slice(line.charAt(5) === ' ' ? 6 : 5, end);
        }).join('\n');
    var chunk;
    try {
        chunk = JSON.parse(data);
    } catch (e) {
        return text; // [DONE], comments, keep-alives
    }
    note(r, chunk);
    if (hide && isObject(chunk) && isObject(chunk.usage) && Array.isArray(chunk.choices) && chunk.choices.length === 0) {
        return '';
    }
    passed += completionText(chunk);
    return hide ? text.replace(NULL_USAGE, '') : text;
}

// The generated text of an answer or of one chunk, as the shim's proxy counts it
// (gateway_shim/usage.py completion_text).
function completionText(document) {
    if (api === 'responses') {
        return responsesText(document);
    }
    if (api === 'messages') {
        return messagesText(document);
    }
    if (!isObject(document) || !Array.isArray(document.choices)) {
        return '';
    }
    var text = '';
    document.choices.forEach(function(choice) {
        if (!isObject(choice)) {
            return;
        }
        [choice.delta, choice.message].forEach(function(holder) {
            if (isObject(holder)) {
                ['content', 'reasoning_content', 'refusal'].forEach(function(field) {
                    if (typeof holder[field] === 'string') {
                        text += holder[field];
                    }
                });
            }
        });
        if (typeof choice.text === 'string') {
            text += choice.text; // legacy completions
        }
    });
    return text;
}

// The Responses API's generated text (gateway_shim/dialects/responses.py): a stream
// event's delta of text, refusal, reasoning or tool arguments; a whole response's
// output items.
var RESPONSES_DELTAS = ['response.output_text.delta', 'response.refusal.delta', 'response.reasoning_text.delta',
                        'response.reasoning_summary_text.delta', 'response.function_call_arguments.delta'];

function responsesText(document) {
    if (!isObject(document)) {
        return '';
    }
    if (typeof document.delta === 'string') {
        return RESPONSES_DELTAS.indexOf(document.type) >= 0 ? document.delta : '';
    }
    var text = '';
    (Array.isArray(document.output) ? document.output : []).forEach(function(item) {
        if (!isObject(item)) {
            return;
        }
        if (typeof item.arguments === 'string') {
            text += item.arguments;
        }
        [item.content, item.summary].forEach(function(parts) {
            (Array.isArray(parts) ? parts : []).forEach(function(part) {
                if (isObject(part)) {
                    text += (typeof part.text === 'string' ? part.text : '')
                        + (typeof part.refusal === 'string' ? part.refusal : '');
                }
            });
        });
    });
    return text;
}

// Anthropic's generated text (gateway_shim/anthropic_messages.py): a
// content_block_delta's text, thinking or tool input; a whole Message's blocks.
function messagesText(document) {
    if (!isObject(document)) {
        return '';
    }
    if (document.type === 'content_block_delta' && isObject(document.delta)) {
        var delta = document.delta;
        var member = {text_delta: 'text', thinking_delta: 'thinking', input_json_delta: 'partial_json'}[delta.type];
        return member && typeof delta[member] === 'string' ? delta[member] : '';
    }
    var text = '';
    (document.type === 'message' && Array.isArray(document.content) ? document.content : []).forEach(function(block) {
        if (!isObject(block)) {
            return;
        }
        if (block.type === 'text' && typeof block.text === 'string') {
            text += block.text;
        } else if (block.type === 'thinking' && typeof block.thinking === 'string') {
            text += block.thinking;
        } else if (block.type === 'tool_use') {
            text += JSON.stringify(block.input === undefined ? {} : block.input);
        }
    });
    return text;
}

// Keep text passed to the client where the report will find it, whenever the
// request ends (a client that leaves ends it without a last buffer). A variable is
// copied whole into the request's memory at each assignment, so rewriting one with
// all the text at each buffer would cost its square; the text is kept instead as
// runs, one per $qm_text_N, merged like a binary counter's bits: the Nth run holds
// 2^N buffers' text, each byte is copied once per level it climbs (at most
// TEXT_SLOTS times), and the report reads the runs from the highest.
function keepText(r, text) {
    if (!text) {
        return;
    }
    textBytes += Buffer.byteLength(text);
    r.variables.qm_text_bytes = String(textBytes);
    var fits = '';
    for (var at = 0; !textFull && at < text.length; at += TEXT_SLICE) {
        var part = text.slice(at, at + TEXT_SLICE);
        var size = Buffer.byteLength(JSON.stringify(part)) - 2;
        if (size > textRoom || runCount === Math.pow(2, TEXT_SLOTS) - 1) {
            textFull = true; // the rest is only counted in bytes
        } else {
            textRoom -= size;
            fits += part;
        }
    }
    if (!fits) {
        return;
    }
    runCount += 1;
    var run = {level: 0, text: fits};
    while (runs.length && runs[runs.length - 1].level === run.level) {
        var older = runs.pop();
        r.variables['qm_text_' + older.level] = '';
        run = {level: run.level + 1, text: older.text + run.text};
    }
    runs.push(run);
    r.variables['qm_text_' + run.level] = run.text;
}

function body(r, data, flags) {
    if (!sse) {
        if (json && keptBytes + data.length <= JSON_LIMIT) {
            kept.push(data);
            keptBytes += data.length;
        }
        r.sendBuffer(data, flags);
        if (flags.last && json) {
            var document;
            try {
                document = JSON.parse(Buffer.concat(kept).toString());
            } catch (e) {
                return; // not JSON, or cut short: no usage to read
            }
            note(r, document);
            if (!r.variables.qm_usage) {
                keepText(r, completionText(document)); // passed whole: the client has it
            }
        }
        return;
    }
    // An event may span buffers: only whole ones are read (and, when hiding, sent).
    var buffered = tail.length ? Buffer.concat([tail, data]) : data;
    var out = '';
    var at = 0;
    var end;
    while ((end = eventEnd(buffered, at)) > 0) {
        out += event(r, buffered.slice(at, end).toString()); // whole events: no UTF-8 sequence cut
        at = end;
    }
    tail = buffered.slice(at);
    keepText(r, passed); // whole events only, as the client's parser reads them
    passed = '';
    if (!hide) {
        r.sendBuffer(data, flags); // passed on as it came
    } else if (flags.last) {
        r.sendBuffer(out + tail.toString(), flags); // a fragment at the end goes as it is
    } else {
        r.sendBuffer(out, flags);
    }
}

// Where the event starting at `from` ends (after its blank line), or -1.
function eventEnd(buffer, from) {
    var lf = buffer.indexOf('\n\n', from);
    var crlf = buffer.indexOf('\n\r\n', from);
    if (lf < 0 && crlf < 0) {
        return -1;
    }
    if (crlf < 0 || (lf >= 0 && lf < crlf)) {
        return lf + 2;
    }
    return crlf + 3;
}

// js_set $qm_report (post_action): the request's usage event, '' when the check
// gave no event id (nothing was reserved, nothing to report).
function report(r) {
    var v = r.variables;
    if (!v.qm_event_id || !v.qm_customer) {
        return '';
    }
    var usage = v.qm_usage ? JSON.parse(v.qm_usage) : null;
    var data = {
        api_key_id: v.qm_key_id || 'nginx',
        tier: v.qm_tier || '',
        route: String(v.request_uri || '').split('?')[0].slice(0, 200),
        status: Number(v.qm_upstream_status) || 502,
        decision: 'admitted',
        reason: v.qm_fallback ? 'fallback' : undefined,
        upstream: 'nginx',
        streamed: v.qm_streamed === '1',
        usage_source: usage ? 'upstream' : 'none',
        latency_ms: Math.round(Number(v.request_time) * 1000),
        request_bytes: Number(v.request_length) || 0,
        response_bytes: Number(v.body_bytes_sent) || 0,
    };
    if (v.qm_model_requested) {
        data.model_requested = v.qm_model_requested;
    }
    if (v.qm_model_served) {
        data.model_served = v.qm_model_served;
    }
    if (usage) {
        Object.assign(data, usage);
    }
    if (v.qm_attribution) {
        // The check's reading of the request's end user, project and tags (ASCII JSON).
        Object.assign(data, JSON.parse(v.qm_attribution));
    }
    var envelope = {
        specversion: '1.0',
        id: v.qm_event_id,
        source: 'nginx/' + (v.hostname || 'gateway'),
        type: 'quotameter.request.v1',
        subject: v.qm_customer,
        time: new Date().toISOString(),
        datacontenttype: 'application/json',
        data: data,
    };
    if (!usage && v.qm_text_bytes) {
        // Extension attributes (strings): the shim counts them and stores neither.
        var text = '';
        for (var level = TEXT_SLOTS - 1; level >= 0; level--) {
            text += v['qm_text_' + level] || '';
        }
        envelope.deliveredtext = text;
        envelope.deliveredbytes = v.qm_text_bytes;
    }
    return JSON.stringify(envelope);
}

export default {admit, upstreamBody, header, body, report};

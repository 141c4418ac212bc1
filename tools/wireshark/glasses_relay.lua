-- glasses_relay.lua: Wireshark / tshark dissector for the glasses-relay link.
--
-- Decodes the bytes docs/protocol.md specifies inside the ATT values of the
-- glasses' TX characteristic (notifications, glasses to phone) and RX
-- characteristic (writes, phone to glasses):
--
--   GATT value = fragment header (2 bytes: FIRST, LAST, channel, sequence)
--                + a piece of one record                     (protocol.md 2)
--   record     = header (version, type, session id, counter)
--                + body (Noise handshake | ciphertext + tag | alert)  (3)
--   messages   = kind, flags, message id, request id, length, body    (4)
--
-- Fragments are reassembled per connection, direction and channel, as the
-- link layer does (protocol.md 2.3): a sequence gap drops every partial
-- record, duplicates and late fragments are dropped, a new FIRST restarts the
-- channel. The record is shown in the frame of its LAST fragment, in a
-- "Reassembled record" tab; the other fragments say which record they belong
-- to (and, in a two-pass dissection such as Wireshark's, the frame that
-- completes it).
--
-- DATA records are encrypted (ChaCha20-Poly1305): their messages are shown
-- only when the packet carries a plaintext comment written by
-- `glasses-relay sniff --plaintext` (lines "glasses-relay message: ... HEX").
-- HANDSHAKE and ALERT records are cleartext and are decoded field by field.
--
-- Registration: by characteristic UUID in the "bluetooth.uuid" table, which
-- works when the capture holds the GATT discovery (captures written by
-- glasses-relay always do). Captures without discovery: set the TX and RX
-- value handles in the preferences (Edit > Preferences > Protocols >
-- GLASSES_RELAY, or `tshark -o glasses_relay.tx_handle:0x0012`).
--
-- Written for Wireshark/tshark 4.0 (Lua 5.2 API). Install: see
-- tools/wireshark/README.md.

local PROTO_VERSION = 1
local TX_CHAR_UUID = "7a3e5c11-94d2-4b8e-9f2a-3d6c8b1e4f70"
local RX_CHAR_UUID = "7a3e5c12-94d2-4b8e-9f2a-3d6c8b1e4f70"

local FRAGMENT_HEADER_SIZE = 2
local RECORD_HEADER_SIZE = 14
local TAG_SIZE = 16
local MESSAGE_HEADER_SIZE = 26
local SEQ_MODULUS = 4096
local SEQ_HALF = 2048
local SEQ_HISTORY = 256
-- Limits.max_record_size: a larger record is dropped (OVERSIZE).
local MAX_RECORD_SIZE = 1048576 + 4096
local PLAINTEXT_PREFIX = "glasses-relay message:"

local proto = Proto("glasses_relay", "Glasses Relay")

local channel_names = {
    [0] = "CONTROL",
    [1] = "INTERACTIVE",
    [2] = "BULK",
    [3] = "STREAM",
}
local record_types = {
    [0x01] = "HANDSHAKE",
    [0x02] = "DATA",
    [0x03] = "ALERT",
}
local alert_codes = {
    [1] = "UNSUPPORTED_VERSION",
    [2] = "BUSY",
    [3] = "NOT_PAIRED",
    [4] = "HANDSHAKE_FAILED",
}
local message_kinds = {
    [0x01] = "ACK",
    [0x02] = "CREDIT",
    [0x03] = "ERROR",
    [0x04] = "CLOCK_SYNC",
    [0x05] = "CANCEL",
    [0x06] = "HEARTBEAT",
    [0x07] = "MODE",
    [0x08] = "PRESENCE",
    [0x10] = "REQUEST",
    [0x11] = "AUDIO_CHUNK",
    [0x12] = "PHOTO_CHUNK",
    [0x13] = "WAKE_WORD",
    [0x20] = "RESPONSE_TEXT",
    [0x21] = "RESPONSE_AUDIO",
    [0x22] = "HOLDING",
    [0x23] = "DISPLAY",
    [0x30] = "EVENT",
    [0x31] = "TELEMETRY",
    [0x32] = "NAVIGATION",
    [0x33] = "PAYMENT",
    [0x34] = "MEDIA_CONTROL",
}
local directions = {
    [0] = "phone>glasses",
    [1] = "glasses>phone",
}

local f = proto.fields
f.direction = ProtoField.string("glasses_relay.direction", "Direction")
f.frag = ProtoField.uint16("glasses_relay.frag", "Fragment header", base.HEX)
f.first = ProtoField.bool("glasses_relay.frag.first", "FIRST", 16, nil, 0x8000)
f.last = ProtoField.bool("glasses_relay.frag.last", "LAST", 16, nil, 0x4000)
f.channel = ProtoField.uint16(
    "glasses_relay.frag.channel", "Channel", base.DEC, channel_names, 0x3000
)
f.seq = ProtoField.uint16("glasses_relay.frag.seq", "Sequence", base.DEC, nil, 0x0FFF)
f.payload = ProtoField.bytes("glasses_relay.frag.payload", "Record piece")
f.part = ProtoField.uint32("glasses_relay.frag.part", "Fragment of record")
f.started_in = ProtoField.framenum(
    "glasses_relay.frag.started_in", "Record started in", base.NONE
)
f.reassembled_in = ProtoField.framenum(
    "glasses_relay.frag.reassembled_in", "Record reassembled in", base.NONE
)
f.fragments = ProtoField.uint32("glasses_relay.record.fragments", "Fragments")
f.frames = ProtoField.string("glasses_relay.record.frames", "Frames")
f.record = ProtoField.bytes("glasses_relay.record", "Record")
f.rec_len = ProtoField.uint32("glasses_relay.record.length", "Record length")
f.version = ProtoField.uint8("glasses_relay.record.version", "Version")
f.rtype = ProtoField.uint8("glasses_relay.record.type", "Type", base.HEX, record_types)
f.session = ProtoField.uint32("glasses_relay.record.session_id", "Session id", base.HEX)
f.counter = ProtoField.uint64("glasses_relay.record.counter", "Counter")
f.handshake = ProtoField.bytes("glasses_relay.record.handshake", "Noise handshake message")
f.ciphertext = ProtoField.bytes("glasses_relay.record.ciphertext", "Ciphertext")
f.tag = ProtoField.bytes("glasses_relay.record.tag", "Tag")
f.alert_code = ProtoField.uint8(
    "glasses_relay.alert.code", "Alert code", base.DEC, alert_codes
)
f.alert_version = ProtoField.uint8("glasses_relay.alert.version", "Supported version")
f.msg = ProtoField.bytes("glasses_relay.msg", "Message")
f.msg_kind = ProtoField.uint8("glasses_relay.msg.kind", "Kind", base.HEX, message_kinds)
f.msg_flags = ProtoField.uint8("glasses_relay.msg.flags", "Flags", base.HEX)
f.msg_final = ProtoField.bool("glasses_relay.msg.flags.final", "FINAL", 8, nil, 0x01)
f.msg_reliable = ProtoField.bool(
    "glasses_relay.msg.flags.reliable", "RELIABLE", 8, nil, 0x02
)
f.msg_realtime = ProtoField.bool(
    "glasses_relay.msg.flags.realtime", "REALTIME", 8, nil, 0x04
)
f.msg_retransmit = ProtoField.bool(
    "glasses_relay.msg.flags.retransmit", "RETRANSMIT", 8, nil, 0x08
)
f.msg_id = ProtoField.bytes("glasses_relay.msg.id", "Message id")
f.msg_request = ProtoField.uint32("glasses_relay.msg.request_id", "Request id")
f.msg_len = ProtoField.uint32("glasses_relay.msg.body_length", "Body length")
f.msg_body = ProtoField.bytes("glasses_relay.msg.body", "Body")

local e = {
    short = ProtoExpert.new(
        "glasses_relay.expert.short", "GATT value shorter than the 2-byte fragment header",
        expert.group.MALFORMED, expert.severity.ERROR
    ),
    lost = ProtoExpert.new(
        "glasses_relay.expert.lost", "Fragments lost (sequence gap)",
        expert.group.SEQUENCE, expert.severity.WARN
    ),
    duplicate = ProtoExpert.new(
        "glasses_relay.expert.duplicate", "Duplicate fragment (dropped)",
        expert.group.SEQUENCE, expert.severity.WARN
    ),
    reordered = ProtoExpert.new(
        "glasses_relay.expert.reordered", "Late fragment, counted lost (dropped)",
        expert.group.SEQUENCE, expert.severity.WARN
    ),
    orphan = ProtoExpert.new(
        "glasses_relay.expert.orphan", "Continuation without a record in progress (dropped)",
        expert.group.SEQUENCE, expert.severity.WARN
    ),
    restarted = ProtoExpert.new(
        "glasses_relay.expert.restarted", "New record before the previous one ended",
        expert.group.SEQUENCE, expert.severity.WARN
    ),
    oversize = ProtoExpert.new(
        "glasses_relay.expert.oversize", "Record exceeds max_record_size (dropped)",
        expert.group.PROTOCOL, expert.severity.WARN
    ),
    bad_record = ProtoExpert.new(
        "glasses_relay.expert.bad_record", "Malformed record",
        expert.group.MALFORMED, expert.severity.ERROR
    ),
    version = ProtoExpert.new(
        "glasses_relay.expert.version", "Unsupported protocol version",
        expert.group.PROTOCOL, expert.severity.WARN
    ),
    cut = ProtoExpert.new(
        "glasses_relay.expert.cut", "Value cut short in the capture (not reassembled)",
        expert.group.UNDECODED, expert.severity.NOTE
    ),
    bad_plaintext = ProtoExpert.new(
        "glasses_relay.expert.bad_plaintext", "Plaintext comment does not parse as messages",
        expert.group.COMMENTS_GROUP, expert.severity.WARN
    ),
}
proto.experts = {
    e.short, e.lost, e.duplicate, e.reordered, e.orphan, e.restarted,
    e.oversize, e.bad_record, e.version, e.cut, e.bad_plaintext,
}

proto.prefs.tx_handle = Pref.string(
    "TX value handle", "",
    "ATT value handle of the TX characteristic (glasses to phone), e.g. 0x0012, "
        .. "for captures without GATT discovery; empty: by UUID only"
)
proto.prefs.rx_handle = Pref.string(
    "RX value handle", "",
    "ATT value handle of the RX characteristic (phone to glasses), e.g. 0x0015, "
        .. "for captures without GATT discovery; empty: by UUID only"
)
proto.prefs.data_plaintext = Pref.bool(
    "DATA bodies are cleartext", false,
    "Decode DATA record bodies (minus the 16-byte tag) as messages: only for "
        .. "unencrypted test vectors, never for real traffic"
)

local f_chandle = Field.new("bthci_acl.chandle")
local f_opcode = Field.new("btatt.opcode")
local f_comment = Field.new("frame.comment")

-- Reassembly state, rebuilt on every (re)load of a file.
local links = {}   -- key "chandle/direction" -> {expected, history, partial[channel]}
local results = {} -- frame number -> what the first pass found

function proto.init()
    links = {}
    results = {}
end

local function direction_of(pinfo)
    local dir = pinfo.p2p_dir
    if dir == 0 or dir == 1 then
        return dir
    end
    local op = f_opcode()
    if op ~= nil and (op.value == 0x1b or op.value == 0x1d) then
        return 1
    end
    return 0
end

local function new_link(seq)
    return { expected = seq, history = {}, order = {}, partial = {} }
end

local function remember(link, seq)
    link.history[seq] = true
    link.order[#link.order + 1] = seq
    if #link.order > SEQ_HISTORY then
        link.history[table.remove(link.order, 1)] = nil
    end
end

local function drop_partials(link, res)
    for channel, partial in pairs(link.partial) do
        res.dropped = (res.dropped or 0) + 1
        link.partial[channel] = nil
    end
end

-- The first pass: run the link layer's receive rules on one fragment.
local function reassemble(pinfo, key, header, payload, cut)
    local first = bit32.band(header, 0x8000) ~= 0
    local last = bit32.band(header, 0x4000) ~= 0
    local channel = bit32.band(bit32.rshift(header, 12), 0x3)
    local seq = bit32.band(header, 0x0FFF)
    local res = { event = "accepted" }
    local link = links[key]
    if link == nil then
        -- The capture may start mid-connection: take the first sequence seen.
        link = new_link(seq)
        links[key] = link
    end
    local d = (seq - link.expected) % SEQ_MODULUS
    if d ~= 0 and d >= SEQ_HALF and first and seq == 0 then
        -- A new connection on a reused handle starts again at 0.
        link = new_link(0)
        links[key] = link
        d = 0
    end
    if d ~= 0 then
        if d < SEQ_HALF then
            res.lost = d
            res.expected = link.expected
            drop_partials(link, res)
        elseif link.history[seq] then
            res.event = "duplicate"
            return res
        else
            res.event = "reordered"
            return res
        end
    end
    link.expected = (seq + 1) % SEQ_MODULUS
    remember(link, seq)
    if cut then
        -- A redacted or filtered capture kept only the start of the value.
        link.partial[channel] = nil
        res.event = "cut"
        return res
    end
    local partial = link.partial[channel]
    if first then
        if partial ~= nil then
            res.restarted = partial.frames[1]
        end
        partial = { pieces = { payload }, size = #payload, frames = { pinfo.number } }
        link.partial[channel] = partial
    elseif partial == nil then
        res.event = "orphan"
        return res
    else
        partial.pieces[#partial.pieces + 1] = payload
        partial.size = partial.size + #payload
        partial.frames[#partial.frames + 1] = pinfo.number
    end
    res.part = #partial.frames
    res.started_in = partial.frames[1]
    if partial.size > MAX_RECORD_SIZE then
        link.partial[channel] = nil
        res.event = "oversize"
        return res
    end
    if last then
        link.partial[channel] = nil
        res.record = table.concat(partial.pieces)
        res.frames = partial.frames
        for i = 1, #partial.frames - 1 do
            local earlier = results[partial.frames[i]]
            if earlier ~= nil then
                earlier.reassembled_in = pinfo.number
            end
        end
    end
    return res
end

-- Messages back to back in `rtvb` (a record plaintext); false if they do not parse.
local function add_messages(rtvb, tree, pinfo)
    local offset = 0
    local len = rtvb:len()
    local kinds = {}
    if len < MESSAGE_HEADER_SIZE then
        return false, kinds
    end
    while offset < len do
        if len - offset < MESSAGE_HEADER_SIZE then
            return false, kinds
        end
        local body_len = rtvb(offset + 22, 4):uint()
        if body_len > len - offset - MESSAGE_HEADER_SIZE then
            return false, kinds
        end
        local size = MESSAGE_HEADER_SIZE + body_len
        local kind = rtvb(offset, 1):uint()
        local name = message_kinds[kind] or string.format("kind 0x%02x", kind)
        local mt = tree:add(f.msg, rtvb(offset, size))
        mt:set_text(string.format(
            "Message %s, request %d, %d byte body", name,
            rtvb(offset + 18, 4):uint(), body_len
        ))
        mt:add(f.msg_kind, rtvb(offset, 1))
        local ft = mt:add(f.msg_flags, rtvb(offset + 1, 1))
        ft:add(f.msg_final, rtvb(offset + 1, 1))
        ft:add(f.msg_reliable, rtvb(offset + 1, 1))
        ft:add(f.msg_realtime, rtvb(offset + 1, 1))
        ft:add(f.msg_retransmit, rtvb(offset + 1, 1))
        mt:add(f.msg_id, rtvb(offset + 2, 16))
        mt:add(f.msg_request, rtvb(offset + 18, 4))
        mt:add(f.msg_len, rtvb(offset + 22, 4))
        if body_len > 0 then
            mt:add(f.msg_body, rtvb(offset + MESSAGE_HEADER_SIZE, body_len))
        end
        kinds[#kinds + 1] = name
        offset = offset + size
    end
    return true, kinds
end

-- Plaintext comments from `glasses-relay sniff --plaintext`, as one byte string.
local function plaintext_from_comments()
    local hex = {}
    for _, comment in ipairs({ f_comment() }) do
        for line in string.gmatch(comment.value, "[^\n]+") do
            if string.sub(line, 1, #PLAINTEXT_PREFIX) == PLAINTEXT_PREFIX then
                local h = string.match(line, "(%x+)%s*$")
                if h ~= nil then
                    hex[#hex + 1] = h
                end
            end
        end
    end
    if #hex == 0 then
        return nil
    end
    return table.concat(hex)
end

local function add_record(res, tree, pinfo)
    local rec = res.record
    local rtvb = ByteArray.new(rec, true):tvb("Reassembled record")
    local rt = tree:add(f.record, rtvb())
    rt:set_text(string.format(
        "Record, %d bytes in %d fragment(s)", #rec, #res.frames
    ))
    rt:add(f.rec_len, rtvb(), #rec):set_generated()
    rt:add(f.fragments, #res.frames):set_generated()
    local frames = {}
    for i, n in ipairs(res.frames) do
        frames[i] = tostring(n)
    end
    rt:add(f.frames, table.concat(frames, ",")):set_generated()
    if #rec < RECORD_HEADER_SIZE then
        rt:add_proto_expert_info(e.bad_record, "Record shorter than its 14-byte header")
        return "bad record"
    end
    rt:add(f.version, rtvb(0, 1))
    local version = rtvb(0, 1):uint()
    local rtype = rtvb(1, 1):uint()
    rt:add(f.rtype, rtvb(1, 1))
    rt:add(f.session, rtvb(2, 4))
    rt:add(f.counter, rtvb(6, 8))
    local type_name = record_types[rtype] or string.format("type 0x%02x", rtype)
    local info = string.format(
        "%s sess=%08x ctr=%s %dB/%d", type_name, rtvb(2, 4):uint(),
        tostring(rtvb(6, 8):uint64()), #rec, #res.frames
    )
    if version ~= PROTO_VERSION then
        rt:add_proto_expert_info(e.version, string.format("Record version %d", version))
        return info
    end
    local body_len = #rec - RECORD_HEADER_SIZE
    if rtype == 0x01 then
        if body_len > 0 then
            rt:add(f.handshake, rtvb(RECORD_HEADER_SIZE, body_len))
        end
    elseif rtype == 0x03 then
        if body_len ~= 2 then
            rt:add_proto_expert_info(e.bad_record, "An alert body is 2 bytes")
        else
            rt:add(f.alert_code, rtvb(RECORD_HEADER_SIZE, 1))
            rt:add(f.alert_version, rtvb(RECORD_HEADER_SIZE + 1, 1))
            local code = rtvb(RECORD_HEADER_SIZE, 1):uint()
            info = info .. " " .. (alert_codes[code] or tostring(code))
        end
    elseif rtype == 0x02 then
        if body_len < TAG_SIZE then
            rt:add_proto_expert_info(e.bad_record, "DATA record shorter than header + tag")
            return info
        end
        if body_len > TAG_SIZE then
            rt:add(f.ciphertext, rtvb(RECORD_HEADER_SIZE, body_len - TAG_SIZE))
        end
        rt:add(f.tag, rtvb(#rec - TAG_SIZE, TAG_SIZE))
        local plain = nil
        local label = "Plaintext messages (from the packet comment)"
        local text = plaintext_from_comments()
        if text ~= nil then
            plain = ByteArray.new(text)
        elseif proto.prefs.data_plaintext and body_len > TAG_SIZE then
            plain = rtvb:bytes(RECORD_HEADER_SIZE, body_len - TAG_SIZE)
            label = "Cleartext messages (preference: DATA bodies are cleartext)"
        end
        if plain ~= nil and plain:len() > 0 then
            local ptvb = plain:tvb("Plaintext")
            local pt = rt:add(proto, ptvb(), label)
            local ok, kinds = add_messages(ptvb, pt, pinfo)
            if not ok then
                pt:add_proto_expert_info(e.bad_plaintext)
            end
            if #kinds > 0 then
                info = info .. " " .. table.concat(kinds, ",")
            end
        end
    else
        rt:add_proto_expert_info(e.bad_record, "Unknown record type")
    end
    return info
end

function proto.dissector(tvb, pinfo, tree)
    local len = tvb:len()
    local dir = direction_of(pinfo)
    pinfo.cols.protocol = "GLASSES_RELAY"
    local root = tree:add(proto, tvb(), "Glasses Relay Fragment")
    root:add(f.direction, directions[dir]):set_generated()
    if len < FRAGMENT_HEADER_SIZE then
        root:add_proto_expert_info(e.short)
        pinfo.cols.info:append(" [GR malformed]")
        return len
    end
    local header = tvb(0, 2):uint()
    local ht = root:add(f.frag, tvb(0, 2))
    ht:add(f.first, tvb(0, 2))
    ht:add(f.last, tvb(0, 2))
    ht:add(f.channel, tvb(0, 2))
    ht:add(f.seq, tvb(0, 2))
    if len > FRAGMENT_HEADER_SIZE then
        root:add(f.payload, tvb(FRAGMENT_HEADER_SIZE, len - FRAGMENT_HEADER_SIZE))
    end
    local seq = bit32.band(header, 0x0FFF)
    local channel = channel_names[bit32.band(bit32.rshift(header, 12), 0x3)]
    local flags = (bit32.band(header, 0x8000) ~= 0 and "F" or "")
        .. (bit32.band(header, 0x4000) ~= 0 and "L" or "")
    if flags == "" then
        flags = "-"
    end
    root:set_text(string.format(
        "Glasses Relay Fragment, %s, %s seq=%d %s", directions[dir], channel, seq,
        flags
    ))

    local res = results[pinfo.number]
    if res == nil and not pinfo.visited then
        local chandle = f_chandle()
        local key = tostring(chandle and chandle.value or -1) .. "/" .. tostring(dir)
        local payload = tvb:raw(FRAGMENT_HEADER_SIZE, len - FRAGMENT_HEADER_SIZE)
        res = reassemble(pinfo, key, header, payload, pinfo.caplen < pinfo.len)
        results[pinfo.number] = res
    end
    local info = string.format("[GR %s seq=%d %s %s]", directions[dir], seq, channel, flags)
    if res ~= nil then
        if res.lost ~= nil then
            root:add_proto_expert_info(e.lost, string.format(
                "%d fragment(s) lost: expected %d, got %d", res.lost, res.expected, seq
            ))
        end
        if res.restarted ~= nil then
            root:add_proto_expert_info(e.restarted, string.format(
                "Record started in frame %d dropped", res.restarted
            ))
        end
        if res.event == "duplicate" then
            root:add_proto_expert_info(e.duplicate)
        elseif res.event == "reordered" then
            root:add_proto_expert_info(e.reordered)
        elseif res.event == "orphan" then
            root:add_proto_expert_info(e.orphan)
        elseif res.event == "oversize" then
            root:add_proto_expert_info(e.oversize)
        elseif res.event == "cut" then
            root:add_proto_expert_info(e.cut)
        end
        if res.part ~= nil then
            root:add(f.part, res.part):set_generated()
            if res.started_in ~= nil and res.started_in ~= pinfo.number then
                root:add(f.started_in, res.started_in):set_generated()
            end
        end
        if res.record ~= nil then
            info = info .. " " .. add_record(res, root, pinfo)
        elseif res.reassembled_in ~= nil then
            root:add(f.reassembled_in, res.reassembled_in):set_generated()
        end
    end
    pinfo.cols.info:append(" " .. info)
    return len
end

-- Registration --------------------------------------------------------------

local uuid_table = DissectorTable.get("bluetooth.uuid")
uuid_table:add(TX_CHAR_UUID, proto)
uuid_table:add(RX_CHAR_UUID, proto)

local handle_table = DissectorTable.get("btatt.handle")
local registered_handles = {}

local function parse_handle(text)
    if text == nil or text == "" then
        return nil
    end
    local value = tonumber(text)
    if value == nil or value < 1 or value > 0xFFFF then
        return nil
    end
    return math.floor(value)
end

function proto.prefs_changed()
    for _, handle in ipairs(registered_handles) do
        handle_table:remove(handle, proto)
    end
    registered_handles = {}
    for _, text in ipairs({ proto.prefs.tx_handle, proto.prefs.rx_handle }) do
        local handle = parse_handle(text)
        if handle ~= nil then
            handle_table:add(handle, proto)
            registered_handles[#registered_handles + 1] = handle
        end
    end
end

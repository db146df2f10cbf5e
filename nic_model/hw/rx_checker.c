/*
 * RX checker (seed 003): integrity, checksum, classification, and the test of
 * a segment against its connection's CCB.
 *
 * The hot path is an IPv4 frame without options carrying TCP to our MAC;
 * every other frame is FP_CLS_UNPARSED and goes to the software checker
 * (nic_model/rx.py), which knows ARP, ICMP, IP options and the rest.  On the
 * hot path the checks, their order and their drop reasons are the software
 * checker's own, so that both count a frame the same way (the differential
 * tests hold them to it).
 *
 * The frame is the virtio header followed by the Ethernet frame, `len` bytes
 * of it valid; nothing past `len` is read, whatever the headers claim.
 */
#include "fp.h"

static inline uint32_t be16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int drop(struct fp_seg *out, uint32_t reason)
{
    out->drop = reason;
    return reason == FP_DROP_NOT_OUR_IP ? FP_CLS_OTHER : FP_CLS_ERROR;
}

/* TCP options between p and end: well formed (kind, length within the header)?  The
 * values the units use are extracted on the way: MSS and window scale (a SYN|ACK, for the
 * connection state unit) and the timestamps (for the units to come: PAWS and RTT from
 * TSecr; today a segment with options other than a SYN|ACK goes to software). */
static int options_ok(const uint8_t *p, const uint8_t *end, struct fp_seg *out)
{
    while (p < end) {
        uint8_t kind = p[0];
        if (kind == 0)
            break;
        if (kind == 1) {
            p++;
            continue;
        }
        if (p + 1 >= end)
            return 0;
        uint8_t l = p[1];
        if (l < 2 || l > end - p)
            return 0;
        if (kind == 2 && l == 4)
            out->mss_opt = be16(p + 2);
        else if (kind == 3 && l == 3)
            out->ws_opt = p[2];
        else if (kind == 8 && l == 10) {
            out->has_ts = 1;
            out->tsval = be32(p + 2);
            out->tsecr = be32(p + 6);
        }
        p += l;
    }
    return 1;
}

int fp_rx_parse(const uint8_t *f, uint32_t len, uint32_t my_ip, const uint8_t *my_mac, struct fp_seg *out)
{
    memset(out, 0, sizeof(*out));
    out->ws_opt = FP_NO_WSCALE;
    if (len < FP_IP_OFF + 40 || be16(f + FP_ETH_OFF + 12) != 0x0800 || memcmp(f + FP_ETH_OFF, my_mac, 6) != 0)
        return FP_CLS_UNPARSED;
    const uint8_t *ip = f + FP_IP_OFF;
    if (ip[0] != 0x45 || ip[9] != 6)
        return FP_CLS_UNPARSED;
    uint32_t s = 0;
    for (int i = 0; i < 20; i += 2)
        s += be16(ip + i);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    if (s != 0xffff)
        return drop(out, FP_DROP_IP_CHECKSUM);
    uint32_t total = be16(ip + 2);
    if (total < 40 || FP_IP_OFF + total > len)
        return drop(out, FP_DROP_IP_LENGTH);
    if (be16(ip + 6) & 0x3fff)
        return drop(out, FP_DROP_IP_FRAGMENT);
    uint32_t src = be32(ip + 12), dst = be32(ip + 16);
    if (dst != my_ip)
        return drop(out, FP_DROP_NOT_OUR_IP);
    const uint8_t *t = ip + 20;
    uint32_t seg_len = total - 20;
    uint32_t hlen = (uint32_t)(t[12] >> 4) * 4;
    uint32_t flags = t[13];
    if (hlen < 20 || hlen > seg_len)
        return drop(out, FP_DROP_TCP_OFFSET);
    if ((flags & TCP_SYN) && (flags & (TCP_FIN | TCP_RST)))
        return drop(out, FP_DROP_TCP_FLAGS);
    out->sport = be16(t);
    out->dport = be16(t + 2);
    if (out->sport == 0 || out->dport == 0)
        return drop(out, FP_DROP_TCP_PORT);
    if (f[0] & 3) {                     /* NEEDS_CSUM | DATA_VALID: the kernel vouches for it */
        out->csum_offloaded = 1;
    } else {
        uint32_t init = (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + 6 + seg_len;
        if (toe_csum_fold(t, seg_len, init) != 0)
            return drop(out, FP_DROP_TCP_CHECKSUM);
    }
    if (hlen > 20) {
        if (!options_ok(t + 20, t + hlen, out))
            return drop(out, FP_DROP_TCP_OPTION);
        out->has_options = 1;
    }
    out->src = src;
    out->dst = dst;
    out->seq = be32(t + 4);
    out->ack = be32(t + 8);
    out->flags = flags;
    out->window = be16(t + 14);
    out->hlen = hlen;
    out->payload_off = FP_TCP_OFF + hlen;
    out->payload_len = seg_len - hlen;
    return (flags & TCP_SYN) && !(flags & TCP_ACK) ? FP_CLS_TCP_SYN : FP_CLS_TCP_DATA;
}

/*
 * Can the units take this segment of a connection they own?  -1: yes;
 * otherwise the FP_PUNT_* reason it goes to software.  Nothing is changed
 * here: RFC 9293 3.10.7.4's first check (acceptability) holds for what
 * passes (in order, within the receive space), the ACK tests are the TX
 * buffer manager's (fp_ack_check).
 */
int fp_rx_fast_ok(const struct fp_ccb *c, const struct fp_seg *g)
{
    uint32_t f = g->flags;
    if (c->state != FP_ST_ESTABLISHED)
        return FP_PUNT_STATE;                 /* the connection state unit's (fp_fsm_check) */
    if (f & TCP_RST)
        return FP_PUNT_RST;
    if (f & TCP_FIN)
        return FP_PUNT_FIN;
    int why = fp_rx_in_order(c, g);
    if (why >= 0)
        return why;
    if (g->payload_len && g->payload_len > fp_rcv_space(c))
        return FP_PUNT_BEYOND_WINDOW;
    return fp_ack_check(c, g);
}

/* The part of the test every synchronized state shares: an ACK without SYN or URG, no
 * options, at rcv_nxt.  -1, or why not. */
int fp_rx_in_order(const struct fp_ccb *c, const struct fp_seg *g)
{
    uint32_t f = g->flags;
    if ((f & (TCP_SYN | TCP_URG)) || !(f & TCP_ACK))
        return FP_PUNT_FLAGS;
    if (g->has_options)
        return FP_PUNT_OPTIONS;
    if (g->seq != c->rcv_nxt)
        return FP_PUNT_OUT_OF_ORDER;
    return -1;
}

"""Image files that declare their origin, for the tests and the demo: C2PA manifests signed by c2pa-python with
a test CA made here, IPTC-tagged JPEG and PNG (an XMP packet written by hand, no exiftool), EXIF-tagged files,
and tampered copies of signed files.

The test CA is not on any trust list, so c2pa reads these manifests as `Valid` (signature and hashes check
out, `signingCredential.untrusted` among its notes) and as `Trusted` only when given `ca_pem` as an anchor.
`test_credentials("other")` is a second, unrelated CA: a signer a trust list of the first does not name."""

from __future__ import annotations

import datetime
import functools
import io
import json
import struct
import zlib
from dataclasses import dataclass

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image, ImageDraw

from moderation.devkit.hostile_images import jpeg_segments, png_chunk, save
from moderation.worker.provenance import C2PA_MIME, IPTC_SOURCE_TYPE

TRAINED_ALGORITHMIC_MEDIA = IPTC_SOURCE_TYPE + "trainedAlgorithmicMedia"
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = IPTC_SOURCE_TYPE + "compositeWithTrainedAlgorithmicMedia"
DIGITAL_CAPTURE = IPTC_SOURCE_TYPE + "digitalCapture"
GENERATOR = "moderation-devkit/1.0"

_JPEG_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_MAX_JPEG_SEGMENT = 0xFFFF - 2


@dataclass(frozen=True)
class SigningCredentials:
    """An ES256 signing certificate issued by a test root CA, PEM-encoded."""

    chain_pem: bytes  # signing certificate, then the CA
    key_pem: bytes
    ca_pem: bytes


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "FOR TESTING ONLY"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _usage(*, sign_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=not sign_certificates,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certificates,
        crl_sign=sign_certificates,
        encipher_only=False,
        decipher_only=False,
    )


@functools.cache
def test_credentials(authority: str = "moderation") -> SigningCredentials:
    """A fresh root CA (named after `authority`) and signing certificate per process and authority. c2pa
    accepts a signing certificate that is not a CA, has critical digitalSignature key usage and a critical
    C2PA-allowed extended key usage (here emailProtection), and is issued by a CA: a self-signed leaf is
    refused when signing."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    organization = f"{authority} test CA"
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{authority} test root CA", organization))
        .issuer_name(_name(f"{authority} test root CA", organization))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(sign_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    signer = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{authority} test signer", organization))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(sign_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return SigningCredentials(
        chain_pem=signer.public_bytes(pem) + ca.public_bytes(pem),
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        ca_pem=ca.public_bytes(pem),
    )


def sample_image(fmt: str = "JPEG", size: tuple[int, int] = (160, 120), *, seed: int = 0) -> bytes:
    """A small picture with no metadata: a gradient and a few shapes (a file c2pa and Pillow both read)."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for index in range(4):
        x, y = (seed * 37 + index * 41) % size[0], (seed * 23 + index * 29) % size[1]
        draw.ellipse((x, y, x + size[0] // 4, y + size[1] // 4), fill=(40 * index, 200 - 40 * index, 90))
    return save(image, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def manifest_definition(digital_source_type: str) -> dict[str, object]:
    """A manifest whose c2pa.actions says the image was created, with this IPTC digitalSourceType."""
    name, version = GENERATOR.split("/")
    return {
        "claim_generator_info": [{"name": name, "version": version}],
        "title": "moderation test image",
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": digital_source_type}]},
            }
        ],
    }


def signed(
    data: bytes,
    fmt: str,
    digital_source_type: str,
    *,
    credentials: SigningCredentials | None = None,
    ingredients: tuple[bytes, ...] = (),
) -> bytes:
    """`data` (a `fmt` file) with an embedded C2PA manifest declaring `digital_source_type`, signed ES256
    by the test signer, without a timestamp authority (nothing here reaches the network). Each of
    `ingredients` (signed `fmt` files themselves, or plain ones) is a parent placed in it (componentOf), its
    own manifest carried along in the store: an AI-made picture composited into a camera capture."""
    credentials = credentials or test_credentials()
    mime = C2PA_MIME[fmt]
    info = c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, credentials.chain_pem, credentials.key_pem, None)
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
    output = io.BytesIO()
    definition = manifest_definition(digital_source_type)
    with context, c2pa.Signer.from_info(info) as signer, c2pa.Builder(definition, context) as builder:
        for index, ingredient in enumerate(ingredients):
            placed = json.dumps({"title": f"ingredient-{index}", "relationship": "componentOf"})
            builder.add_ingredient(placed, mime, io.BytesIO(ingredient))
        builder.sign(signer, mime, io.BytesIO(data), output)
    return output.getvalue()


def xmp_packet(digital_source_type: str, *, form: str = "attribute") -> bytes:
    """An XMP packet with Iptc4xmpExt:DigitalSourceType as an rdf:Description attribute, as an element with
    the URI as text ("element"), or as an element with rdf:resource ("resource")."""
    ns = 'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
    tag = "Iptc4xmpExt:DigitalSourceType"
    opening = f'<rdf:Description rdf:about="" {ns}'
    description = {
        "attribute": f'{opening} {tag}="{digital_source_type}"/>',
        "element": f"{opening}><{tag}>{digital_source_type}</{tag}></rdf:Description>",
        "resource": f'{opening}><{tag} rdf:resource="{digital_source_type}"/></rdf:Description>',
    }[form]
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f"{description}</rdf:RDF></x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()


def with_xmp(data: bytes, fmt: str, xmp: bytes, *, compressed: bool = False) -> bytes:
    """`data` with `xmp` inserted as it is (any bytes, for hostile cases too): a JPEG APP1 segment after
    SOI/APP0, or a PNG iTXt chunk XML:com.adobe.xmp right after IHDR."""
    if fmt == "JPEG":
        if len(_JPEG_XMP) + len(xmp) > _MAX_JPEG_SEGMENT:
            raise ValueError(f"{len(xmp)} bytes of XMP do not fit a JPEG segment")
        segment = b"\xff\xe1" + struct.pack(">H", 2 + len(_JPEG_XMP) + len(xmp)) + _JPEG_XMP + xmp
        first = jpeg_segments(data)[0]
        at = first[2] if first[0] == 0xE0 else 2
        return data[:at] + segment + data[at:]
    if fmt == "PNG":
        text = zlib.compress(xmp) if compressed else xmp
        chunk = png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00" + bytes([compressed, 0]) + b"\x00\x00" + text)
        return data[:33] + chunk + data[33:]
    raise ValueError(f"no XMP writer for {fmt}")


def iptc_tagged(data: bytes, fmt: str, digital_source_type: str, *, form: str = "attribute") -> bytes:
    return with_xmp(data, fmt, xmp_packet(digital_source_type, form=form))


def with_exif(fmt: str = "JPEG", *, software: str = "", make: str = "", model: str = "") -> bytes:
    """A sample image whose EXIF has these Software/Make/Model (JPEG APP1, PNG eXIf), written by Pillow."""
    exif = Image.Exif()
    for tag, value in ((0x0131, software), (0x010F, make), (0x0110, model)):
        if value:
            exif[tag] = value
    image = Image.open(io.BytesIO(sample_image(fmt)))
    return save(image, fmt, exif=exif)


def tampered(data: bytes, fmt: str) -> bytes:
    """A signed file whose pixels changed after signing, still a decodable image: a JPEG with bytes of its
    entropy-coded data flipped, a PNG with its image data re-encoded from edited pixels."""
    if fmt == "JPEG":
        return _flip_scan_bytes(data)
    if fmt == "PNG":
        return _png_with_new_pixels(data)
    raise ValueError(f"no tampering for {fmt}")


def _flip_scan_bytes(data: bytes) -> bytes:
    scan = next((start, end) for marker, start, end in jpeg_segments(data) if marker == 0xDA)
    edited = bytearray(data)
    flipped = 0
    for at in range((scan[0] + scan[1]) // 2, scan[1] - 1):
        # Leave markers, stuffed zeros and anything a flip would turn into 0xFF alone.
        if 0xFF in (edited[at - 1], edited[at], edited[at] ^ 0x01):
            continue
        edited[at] ^= 0x01
        flipped += 1
        if flipped == 8:
            break
    return bytes(edited)


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk, end past its CRC."""
    chunks, position = [], 8
    while position + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        chunks.append((data[position + 4 : position + 8], position, position + 12 + length))
        position += 12 + length
    return chunks


def _png_with_new_pixels(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data))
    if image.mode != "RGB":
        raise ValueError(f"tampering keeps the PNG header: RGB only, not {image.mode}")
    ImageDraw.Draw(image).rectangle((0, 0, image.width // 3, image.height // 3), fill=(255, 0, 255))
    fresh = save(image, "PNG")
    new_data = b"".join(fresh[start:end] for kind, start, end in _png_chunks(fresh) if kind == b"IDAT")
    old = [(start, end) for kind, start, end in _png_chunks(data) if kind == b"IDAT"]
    return data[: old[0][0]] + new_data + data[old[-1][1] :]
